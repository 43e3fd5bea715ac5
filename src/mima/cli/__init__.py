"""The `mima` command line.

Each subcommand is one module of this package exposing `register(subparsers)`, which adds its parser and sets
`func(args) -> int | None`. Modules only parse, build a config and make one library call; heavy libraries are
imported inside `func`, so `mima --help` and `mima toy concepts` stay fast. Adding a subcommand is one new module
plus one entry in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from mima.errors import MimaError

COMMANDS = (
    "toy",
    "generate",
    "immunize",
    "attack",
    "attack-sweep",
    "validate",
    "benchmark",
    "evaluate",
    "ls",
)


def build_parser() -> argparse.ArgumentParser:
    """The `mima` argument parser with every subcommand of `COMMANDS` registered."""
    parser = argparse.ArgumentParser(
        prog="mima", description="Immunize text-to-image diffusion models against malicious fine-tuning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `mima` with `argv` (default: `sys.argv[1:]`) and return the exit status.

    Deliberate errors ([`~mima.errors.MimaError`]) and the operating system's refusals (a read-only or full disk, a
    missing permission, an output path under a file) print one line, `mima: error: ...`, and
    return 2, like argparse's usage errors; an interrupt returns 130.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors; return their status instead of exiting
        return e.code if isinstance(e.code, int) else 0
    _quiet_hub_libraries()
    try:
        return args.func(args) or 0
    except MimaError as e:
        return _fail(str(e))
    except BrokenPipeError:  # the reader went away (`mima ls | head`): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141
    except OSError as e:
        if e.errno is None:  # not the operating system's refusal (read-only, full disk, permission) but a bug
            raise
        return _fail(f"{e.strerror or e}: '{e.filename}'" if e.filename else f"{e.strerror or e}")
    except KeyboardInterrupt:
        print("mima: interrupted", file=sys.stderr)
        return 130


def _quiet_hub_libraries() -> None:
    """Keep the terminal for mima's own progress bars and errors: no per-file loading bars or info chatter.

    Environment variables, read when the libraries are first imported, so commands that never load them stay fast.
    """
    for name, value in (("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)


def _fail(message: str) -> int:
    one_line = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"mima: error: {one_line}", file=sys.stderr)
    return 2


def _version() -> str:
    try:
        return metadata.version("mima")
    except metadata.PackageNotFoundError:
        return "(not installed)"
