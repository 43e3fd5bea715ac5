"""The worst case of an attack sweep (`mima attack-sweep`): which attack setting re-learns the concept best.

With runs of the same grid on a reference model (the un-immunized one), each run is scored by its MSGR against its
twin there ([`evaluate_runs`], the evaluation of `mima evaluate`): the lowest MSGR is the setting the immunization
slows least. Without one, each run is scored by the similarity of its last checkpoint's samples to the concept's
images: the highest is the setting that draws the concept best. Either way the worst case comes first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mima.evaluate.encoders import get_encoder
from mima.evaluate.evaluate import PathLike, evaluate_runs, read_attack_run, run_similarity
from mima.evaluate.metrics import MSGR
from mima.utils.device import resolve_device
from mima.utils.io import atomic_write_text
from mima.utils.provenance import provenance


@dataclass(frozen=True)
class SweepResult:
    """One run of a sweep: its setting (as `attack.json` records it), its last checkpoint's similarity to the
    concept's images and, with a reference run, its MSGR against that run (percent)."""

    run: str
    method: str
    lr: float
    steps: int
    prompt: str
    final_similarity: float
    msgr: float | None = None
    reference_run: str | None = None


def rank_sweep(
    runs: Sequence[PathLike], references: PathLike, encoder: str, *,
    reference_runs: Sequence[PathLike] | None = None, device: str = "auto",
) -> list[SweepResult]:
    """Score every run of a sweep with `encoder` (a spec) against the image folder `references`, worst case first.

    `reference_runs[i]`, when given, is run i's twin on the reference model: runs are then ranked by MSGR, lowest
    first; else by the last checkpoint's similarity, highest first.
    """
    built = get_encoder(encoder, resolve_device(device))
    twins = list(reference_runs) if reference_runs is not None else [None] * len(runs)
    results = []
    for run, twin in zip(runs, twins, strict=True):
        record = json.loads((Path(run) / "attack.json").read_text(encoding="utf-8"))
        config = record["config"]
        final, msgr = run_similarity(run, references, built).values[-1], None
        if twin is not None:
            concept = read_attack_run(run).concept
            evaluation = evaluate_runs({concept: (twin, run)}, {concept: references}, [built], device=device)
            msgr = evaluation.encoders[built.name].value(MSGR)
            msgr = None if math.isnan(msgr) else msgr
        results.append(SweepResult(str(run), config["method"], config["lr"], config["steps"],
                                   record.get("prompt_mode", "concept"), final, msgr,
                                   None if twin is None else str(twin)))
    if reference_runs is not None:
        return sorted(results, key=lambda r: math.inf if r.msgr is None else r.msgr)
    return sorted(results, key=lambda r: -r.final_similarity)


def write_sweep(results: list[SweepResult], encoder: str, out_dir: PathLike) -> Path:
    """`sweep.json`: how the runs were ranked, the worst case and every run in rank order."""
    ranked_by = "msgr" if results and results[0].reference_run is not None else "final_similarity"
    record = {"encoder": encoder, "ranked_by": ranked_by, "worst_case": asdict(results[0]) if results else None,
              "runs": [asdict(r) for r in results], **provenance()}
    path = Path(out_dir) / "sweep.json"
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def sweep_table(results: list[SweepResult]) -> str:
    """The ranked runs as a text table, the worst case first."""
    rows = [["rank", "method", "lr", "steps", "prompt", "final S", "MSGR %"]]
    for rank, r in enumerate(results, 1):
        prompt = r.prompt if len(r.prompt) <= 30 else r.prompt[:27] + "..."
        msgr = "n/a" if r.msgr is None else f"{r.msgr:.1f}"
        rows.append([str(rank), r.method, f"{r.lr:g}", str(r.steps), prompt, f"{r.final_similarity:.4f}", msgr])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
