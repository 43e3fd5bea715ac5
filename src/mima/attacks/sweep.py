"""A grid of attacks (methods x learning rates x step budgets) on one model and concept: the input to a
worst-case report. Resumable: a finished run (with its attack.json) is skipped, an interrupted one resumed. The
whole grid is resolved before its first run, and a finished run made with other settings is refused."""

from __future__ import annotations

import itertools
from pathlib import Path

from mima.attacks import AttackConfig, AttackRun
from mima.data.concepts import ConceptSpec
from mima.utils.checkpoint import has_checkpoint
from mima.utils.run_folder import ATTACK, finished_run


def sweep_folder(out_dir: Path, method: str, lr: float | None, steps: int | None) -> Path:
    return out_dir / method / f"lr{lr if lr is not None else 'default'}" / f"steps{steps or 'default'}"


def run_sweep(
    model: str, concept: ConceptSpec, base: AttackConfig, methods: list[str], lrs: list[float | None],
    budgets: list[int | None], out_dir: Path, device: str = "auto",
) -> list[Path]:
    """Run every (method, lr, steps) not yet finished, on `device`; returns every run folder of the grid."""
    runs = [
        AttackRun(model, concept, base.with_overrides(method=method, lr=lr, steps=steps),
                  sweep_folder(out_dir, method, lr, steps), device)
        for method, lr, steps in itertools.product(methods, lrs, budgets)
    ]
    for run in runs:
        run.config.check_names()
    todo = [run for run in runs if not finished_run(run.out_dir, ATTACK, run.differences)]
    for run in todo:
        run.run(resume=has_checkpoint(run.out_dir / "checkpoint"))
    return [run.out_dir for run in runs]
