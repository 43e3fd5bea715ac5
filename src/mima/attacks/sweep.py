"""A grid of attacks (methods x learning rates x step budgets x prompts) on one model and concept: the input to a
worst-case report (`mima.evaluate.sweep`). Resumable: a finished run (with its attack.json) is skipped, an
interrupted one resumed. The whole grid is resolved and checked before its first run, and a finished run made
with other settings is refused."""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

from mima.attacks import AttackConfig, AttackRun
from mima.attacks.config import CONCEPT_PROMPT, FRESH_TOKEN_PROMPT
from mima.data.concepts import ConceptSpec
from mima.utils.checkpoint import has_checkpoint
from mima.utils.run_folder import ATTACK, finished_run


def prompt_folder(prompt: str | None) -> str:
    """`prompt-<mode>`, or for a fixed text its first words and a short hash (two texts never share a folder)."""
    if prompt is None or prompt in (CONCEPT_PROMPT, FRESH_TOKEN_PROMPT):
        return f"prompt-{prompt or 'default'}"
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-")
    return f"prompt-text-{words}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"


def sweep_folder(out_dir: Path, method: str, lr: float | None, steps: int | None, prompt: str | None = None) -> Path:
    lr_part = f"lr{lr if lr is not None else 'default'}"
    return out_dir / method / lr_part / f"steps{steps or 'default'}" / prompt_folder(prompt)


def sweep_runs(
    model: str, concept: ConceptSpec, base: AttackConfig, methods: list[str], lrs: list[float | None],
    budgets: list[int | None], prompts: list[str | None], out_dir: Path, device: str = "auto",
) -> list[AttackRun]:
    """Every (method, lr, steps, prompt) of the grid as a run into `out_dir/<method>/lr<lr>/steps<k>/prompt-<p>`
    (None: the method's default), settings resolved."""
    return [
        AttackRun(model, concept, base.with_overrides(method=method, lr=lr, steps=steps, prompt=prompt),
                  sweep_folder(out_dir, method, lr, steps, prompt), device)
        for method, lr, steps, prompt in itertools.product(methods, lrs, budgets, prompts)
    ]


def run_sweep(runs: list[AttackRun]) -> list[Path]:
    """Check every run (names, prompts and tokens, settings of finished ones), then run those not finished;
    returns every run folder."""
    for run in runs:
        run.config.check_names()
        run.check()
    todo = [run for run in runs if not finished_run(run.out_dir, ATTACK, run.differences)]
    for run in todo:
        run.run(resume=has_checkpoint(run.out_dir / "checkpoint"))
    return [run.out_dir for run in runs]
