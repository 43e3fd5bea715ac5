"""The one rule for a run's output folder (`--out`), shared by every command that writes a run.

A run folder holds only what its run writes ([`RunLayout`] `parts`, and the hidden temporaries of atomic writes).
[`claim_run_folder`], called before any model loads:

- refuses a folder that holds anything else (someone else's files), whatever the options;
- refuses a finished run (its record file) unless `overwrite`, which first removes the old run completely;
- refuses an unfinished run (a checkpoint) unless `resume` (or `overwrite`); on `resume` it compares the settings the
  checkpoint recorded with the run's own and refuses, naming the fields, when they differ;
- otherwise starts afresh: leftovers of a run killed before its first checkpoint are removed, so that nothing stale
  (cached images, samples) leaks into the new run, and the run's settings are recorded for a later `--resume`.

[`finished_run`] is the same rule for a benchmark or sweep that skips its finished pieces.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mima.errors import ConfigError

Differences = Callable[[Mapping[str, Any]], dict[str, tuple]]
"""Given recorded settings (a checkpoint's, or a finished run's record), the ones that differ: {name: (old, new)}."""


@dataclass(frozen=True)
class RunLayout:
    """What one kind of run writes at the top of its folder."""

    command: str
    """The command that writes it, for messages."""
    record: str
    """The file that marks a finished run."""
    parts: tuple[str, ...]
    """Glob patterns of every entry the run writes."""
    checkpoint: str | None = "checkpoint"
    """The checkpoint folder, if the run can be resumed."""

    def owns(self, name: str) -> bool:
        """Whether an entry named `name` is one of the run's parts or an atomic write's temporary of one."""
        return any(fnmatch.fnmatchcase(name, part) or fnmatch.fnmatchcase(name, f".{part}.*") for part in self.parts)


_FEATURE_CACHE = ".feature_cache"  # what evaluating a folder of images adds to it (mima.evaluate.cache)
IMMUNIZATION = RunLayout("mima immunize", "immunization.json", ("model", "data", "checkpoint", "immunization.json"))
ATTACK = RunLayout("mima attack", "attack.json",
                   ("export", "samples", "data", "checkpoint", "attack.json", _FEATURE_CACHE))
BYSTANDER = RunLayout("mima benchmark", "drawing.json", ("samples", "drawing.json"), None)
TOY_IMAGES = RunLayout("mima toy images", "metadata.csv",
                       ("[0-9][0-9][0-9][0-9][0-9].png", "metadata.csv", _FEATURE_CACHE), None)


def claim_run_folder(
    folder: Path, layout: RunLayout, settings: Mapping[str, Any] | None = None, *, resume: bool = False,
    overwrite: bool = False, differences: Differences | None = None,
) -> None:
    """Make `folder` ready for a run of `layout` (see the module's rule), or raise before anything is written.

    Args:
        folder (`Path`):
            The run's output folder; created if missing.
        layout ([`RunLayout`]):
            What the run writes.
        settings (`Mapping[str, Any]`, *optional*):
            The run's settings, recorded with its checkpoint (a JSON-safe subset of its final record).
        resume (`bool`, defaults to `False`):
            Continue the unfinished run in `folder`.
        overwrite (`bool`, defaults to `False`):
            Remove a finished or unfinished run in `folder` first.
        differences ([`Differences`], *optional*):
            Compares a checkpoint's recorded settings with this run's; needed with `resume`.

    Raises:
        [`~mima.errors.ConfigError`]: On a folder that is not this run's to write, naming why and what to pass.
    """
    from mima.utils.checkpoint import has_checkpoint, write_settings  # imports torch: keep this module light

    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass only one of them")
    _refuse_foreign(folder, layout)
    if resume:
        _check_resumable(folder, layout, differences)
        _remove_temporaries(folder, layout)
        return
    if not overwrite:
        if (folder / layout.record).exists():
            raise ConfigError(f"'{folder}' holds a finished `{layout.command}` run ({layout.record}); pass "
                              f"--overwrite to replace it, or choose another --out")
        if layout.checkpoint and has_checkpoint(folder / layout.checkpoint):
            raise ConfigError(f"'{folder / layout.checkpoint}' holds an unfinished run; pass --resume to continue it, "
                              f"--overwrite to start afresh, or choose another --out")
    remove_run(folder, layout)
    folder.mkdir(parents=True, exist_ok=True)
    if layout.checkpoint and settings is not None:
        write_settings(folder / layout.checkpoint, settings)


def finished_run(folder: Path, layout: RunLayout, differences: Differences) -> bool:
    """Whether `folder` holds a finished run made with the same settings (so that a benchmark or sweep may skip it).

    Raises:
        [`~mima.errors.ConfigError`]: If the finished run was made with other settings, naming them.
    """
    path = folder / layout.record
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"the run record '{path}' is not valid JSON ({e}); delete '{folder}' to redo it") from None
    changed = differences(record)
    if changed:
        raise ConfigError(f"'{folder}' was made with other settings ({describe(changed)}); delete it or use another "
                          f"--out")
    return True


def remove_run(folder: Path, layout: RunLayout) -> None:
    """Delete every part of a run of `layout` in `folder` (and nothing else)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if layout.owns(entry.name):
            _delete(entry)


def _remove_temporaries(folder: Path, layout: RunLayout) -> None:
    """Half-written temporaries a killed run left (not a `.trash-` folder: it may hold the last whole checkpoint)."""
    for entry in folder.iterdir():
        if any(fnmatch.fnmatchcase(entry.name, pattern) for part in layout.parts
               for pattern in (f".{part}.tmp-*", f".{part}.*.tmp")):
            _delete(entry)


def _delete(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def describe(differences: Mapping[str, tuple]) -> str:
    """`name: old -> new; ...`, for messages about differing settings."""
    return "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in differences.items())


def _refuse_foreign(folder: Path, layout: RunLayout) -> None:
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"--out '{folder}' is a file, not a folder")
    foreign = sorted(entry.name for entry in folder.iterdir() if not layout.owns(entry.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"--out '{folder}' holds files that `{layout.command}` did not write ({shown}); choose an "
                          f"empty or new folder")


def _check_resumable(folder: Path, layout: RunLayout, differences: Differences | None) -> None:
    from mima.utils.checkpoint import has_checkpoint, read_settings

    checkpoint = folder / (layout.checkpoint or "checkpoint")
    if not layout.checkpoint or not has_checkpoint(checkpoint):
        if (folder / layout.record).exists():
            raise ConfigError(f"--resume: '{folder}' holds a finished run, there is nothing to resume; pass "
                              f"--overwrite to redo it")
        raise ConfigError(f"--resume: no checkpoint in '{checkpoint}' to resume; run without --resume to start")
    recorded = read_settings(checkpoint)
    if recorded is None:
        raise ConfigError(f"--resume: the checkpoint in '{checkpoint}' records no settings (an older mima made it), "
                          f"so it cannot be checked against this run; start afresh with --overwrite")
    changed = differences(recorded) if differences is not None else {}
    if changed:
        raise ConfigError(f"--resume: the checkpoint in '{checkpoint}' was made with other settings "
                          f"({describe(changed)}); resume with those settings, or start afresh with --overwrite")
