"""The benchmark's report: every method against the un-immunized model, per attack, encoder and seed.

It only formats: the benchmark ([`mima.benchmark.Benchmark`]) makes the evaluations. Writes `metrics.json` (summary +
every evaluation + timings + provenance), `report.md`, a self-contained `report.html` (images embedded),
similarity-vs-step figures with one line per method, and sample grids with one row per method.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from mima.data.image_folder import read_image_folder
from mima.evaluate.report import slug
from mima.evaluate.summary import (
    UNIMMUNIZED,
    BeforeAttack,
    Drawings,
    Evaluations,
    Summary,
    WorstCase,
    before_attack,
    evaluations_to_json,
    mean,
    summarize,
    worst_cases,
)
from mima.sampling import save_grid
from mima.utils.io import atomic_write_text
from mima.utils.provenance import provenance


def _curve_figure(evaluations: Evaluations, attack: str, encoder: str, concepts: list[str], path: Path) -> Path:
    """One panel per concept: S(t) of the attacked un-immunized model and of each immunized one (seed mean)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.6 * len(concepts), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    for i, concept in enumerate(concepts):
        axes = figure.add_subplot(1, len(concepts), i + 1)
        first = True
        for method, by_attack in evaluations.items():
            results = [e.encoders[encoder].concepts[concept] for e in by_attack[attack].values()]
            steps = results[0].steps
            if first:
                axes.plot(steps, np.mean([r.s_without for r in results], axis=0), "k--", label=UNIMMUNIZED)
                first = False
            axes.plot(steps, np.mean([r.s_with for r in results], axis=0), "o-", label=method)
        axes.set_title(concept + ("" if results[0].target else " (non-target)"))
        axes.set_xlabel(f"{attack} step")
        axes.set_ylabel(f"similarity ({encoder})")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    return path


def _sample_grid(runs: dict, attack: str, concept: str, seed: int, path: Path) -> Path:
    """Rows: the un-immunized model, then each method; columns: the last checkpoint's first samples."""
    last = [max((runs[method][(attack, concept, seed)] / "samples").iterdir(), key=lambda p: int(p.name[5:]))
            for method in runs]
    return _grid(last, path)


def _grid(folders: list[Path], path: Path, n: int = 8) -> Path:
    """One row per image folder: its first `n` samples."""
    rows = [[np.asarray(image) for image in read_image_folder(folder)[0][:n]] for folder in folders]
    columns = min(len(row) for row in rows)
    return save_grid(np.stack([image for row in rows for image in row[:columns]]), path, columns=columns)


def _embed(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" style="max-width:100%">'


def _table(summary: Summary) -> list[list[str]]:
    rows = [["method", "attack", "encoder", "MSGR %", "MRSGR %", "mean non-target |SGR| %",
             "the same between two un-immunized runs %"]]
    for method, by_attack in summary.items():
        for attack, by_encoder in by_attack.items():
            for encoder, row in by_encoder.items():
                non_target = mean(abs(v) for v in row.non_target_sgr.values() if v is not None)
                msgr = _percent(row.msgr) + ("" if row.msgr_sd is None else f" ± {row.msgr_sd:.1f}")
                rows.append([method, attack, encoder, msgr, _percent(row.mrsgr), _percent(non_target),
                             _percent(mean(row.between_runs.values()))])
    return rows


def _worst_case_table(worst: dict[str, dict[str, WorstCase]], attacks: list[str]) -> list[list[str]]:
    """Rows (method, encoder): the lowest MSGR over the attacks and its attack, then every attack's MSGR."""
    rows = [["method", "encoder", "worst-case MSGR %", "worst attack", *(f"MSGR % {a}" for a in attacks)]]
    for method, by_encoder in worst.items():
        for encoder, case in by_encoder.items():
            cells = [case.per_attack.get(a) for a in attacks]
            rows.append([method, encoder, _percent(case.msgr), case.attack or "n/a", *map(_percent, cells)])
    return rows


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _before_attack_table(before: BeforeAttack, concepts: list[str], kept: dict[str, str]) -> list[list[str]]:
    """Rows (encoder, concept), columns the models: similarity to the references, and the judge's rate if known;
    `kept` labels the non-targets and bystanders."""
    models = list(before.models)
    rows = [["encoder", "concept", *models]]
    for encoder in before.models[models[0]]:
        for concept in (c for c in concepts if c in before.models[models[0]][encoder]):
            cells = []
            for model in models:
                drawing = before.models[model][encoder][concept]
                cell = "n/a" if drawing.similarity is None else f"{drawing.similarity:.3f}"
                cells.append(cell + (f" ({100 * drawing.success_rate:.0f} %)" if drawing.success_rate is not None
                                     else ""))
            rows.append([encoder, concept + (f" ({kept[concept]})" if concept in kept else ""), *cells])
    return rows


def write_benchmark_report(
    evaluations: Evaluations, runs: dict[str, dict[tuple[str, str, int], Path]], *, targets: list[str],
    non_targets: list[str], config: Any, timings: dict[str, dict[str, float]], out_dir: Path,
    bystanders: dict[str, dict[str, Path]] | None = None, drawn: Drawings | None = None,
) -> Path:
    """Write the report folder of a benchmark's `evaluations` (sample grids from the attack `runs`' folders); the
    `bystanders`' samples (concept -> model -> the first seed's image folder) and what they show (`drawn`, model ->
    encoder -> concept) join the table before any attack."""
    concepts = targets + non_targets
    summary = summarize(evaluations, targets, non_targets)
    attacks = config.attack_names()
    figures = [_curve_figure(evaluations, a, e, concepts, out_dir / "figures" / f"similarity-{slug(a)}-{slug(e)}.png")
               for a in attacks for e in config.encoders]
    bystanders = bystanders or {}
    grids = [_sample_grid(runs, a, c, config.seeds[0], out_dir / "grids" / f"{slug(a)}-{slug(c)}.png")
             for a in attacks for c in concepts]
    grids += [_grid(list(folders.values()), out_dir / "grids" / f"before-attack-{slug(c)}.png")
              for c, folders in bystanders.items()]
    plain = [v.name for v in config.attack_variants() if not v.rewrites_prompts(config.attack)]
    before = before_attack(evaluations, plain, concepts, drawn)
    bystander_names = list(bystanders)
    worst = worst_cases(summary)
    warnings = before.damaged(non_targets, bystander_names) if before else []
    record = {
        "warnings": warnings,
        "worst_case": {method: {encoder: case.to_json() for encoder, case in by_encoder.items()}
                       for method, by_encoder in worst.items()},
        "summary": {method: {attack: {encoder: row.to_json() for encoder, row in by_encoder.items()}
                             for attack, by_encoder in by_attack.items()} for method, by_attack in summary.items()},
        "before_attack": before.to_json() if before else {}, "evaluations": evaluations_to_json(evaluations),
        "config": config.to_dict(), "timings_s": timings, **provenance(),
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    kept = {concept: "non-target" for concept in non_targets} | dict.fromkeys(bystander_names, "bystander")
    before_table = _before_attack_table(before, concepts + bystander_names, kept) if before else None
    tables = (_worst_case_table(worst, attacks), _table(summary))
    _write_documents(tables, (before_table, warnings, bool(plain)), figures, grids, list(runs), timings, out_dir)
    for warning in warnings:
        print(f"mima: warning: {warning}")
    return out_dir


def _markdown_table(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return [lines[0], "|" + "---|" * len(rows[0]), *lines[1:]]


def _html_table(rows: list[list[str]], table_id: str) -> str:
    cells = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{c}</{'th' if i == 0 else 'td'}>" for c in row)
                    + "</tr>" for i, row in enumerate(rows))
    return f"<table id='{table_id}'>{cells}</table>"


def _write_documents(tables: tuple[list[list[str]], list[list[str]]],
                     before: tuple[list[list[str]] | None, list[str], bool], figures: list[Path],
                     grids: list[Path], methods: list[str], timings: dict[str, dict[str, float]],
                     out_dir: Path) -> None:
    """`tables`: the worst case over attacks, then the main table (every method, attack and encoder); `before`: the
    table before any attack, its warnings (`BeforeAttack.damaged`) and whether it holds the attacked concepts."""
    worst_table, table = tables
    before_table, warnings, attacked_drawn = before
    worst_legend = ("Worst case over attacks: per model and encoder, the attack the immunization slows least (the "
                    "lowest MSGR, seed means), then every attack's MSGR.")
    legend = ("MSGR / MRSGR: higher = stronger immunization (± the standard deviation over seeds, when there are "
              "several); non-target |SGR|: near 0 = other concepts stay learnable; beside it, the same between two "
              "seeds' runs of the un-immunized model: a gap below it is within the attack's own spread "
              "(definitions: docs/metrics.md).")
    before_legend = ("Each model's own samples of each concept's prompt, before any attack step: similarity to the "
                     "references (judge's rate). Non-targets and bystanders (concepts drawn but never attacked) "
                     "should match `none`; targets should be low.")
    grid_legend = "Each attack's last checkpoint; before-attack-*: a bystander's samples before any attack."
    if not attacked_drawn:
        before_legend = ("The attacked concepts are not measured: every attack rewrites the concept's prompt (a new "
                         "token, a fresh token or a fixed text), so its step 0 is not the model's own drawing. "
                         + ("Bystanders (concepts drawn but never attacked) should match `none`."
                            if before_table else ""))
    time_line = "Time (s). " + "; ".join(
        f"{kind}: " + ", ".join(f"{phase} {seconds:.0f}" for phase, seconds in phases.items())
        for kind, phases in timings.items())
    md = ["# mima benchmark report", "", worst_legend, "", *_markdown_table(worst_table), "", legend, "",
          *_markdown_table(table), "", time_line, "",
          "## Before any attack", "", *(f"**Warning:** {w}." for w in warnings), "", before_legend, ""]
    md += _markdown_table(before_table) if before_table else []
    md += ["", "## Similarity vs attack steps"]
    md += [f"![{f.stem}]({f.relative_to(out_dir)})" for f in figures]
    md += ["", f"## Samples (rows: {', '.join(methods)})", "", grid_legend]
    md += [f"![{g.stem}]({g.relative_to(out_dir)})" for g in grids]
    atomic_write_text(out_dir / "report.md", "\n".join(md) + "\n")
    html = ["<!doctype html><html><head><meta charset='utf-8'><title>mima benchmark report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #999;padding:4px 8px}</style></head><body>",
            "<h1>mima benchmark report</h1>", f"<p>{worst_legend}</p>", _html_table(worst_table, "worst-case"),
            f"<p>{legend}</p>", _html_table(table, "summary"),
            f"<p>{time_line}</p>", "<h2>Before any attack</h2>",
            *(f"<p class='warning'><b>Warning:</b> {w}.</p>" for w in warnings), f"<p>{before_legend}</p>",
            _html_table(before_table, "before-attack") if before_table else "", "<h2>Similarity vs attack steps</h2>",
            *(_embed(f) for f in figures), f"<h2>Samples (rows: {', '.join(methods)})</h2>", f"<p>{grid_legend}</p>",
            *(f"<h3>{g.stem}</h3>{_embed(g)}" for g in grids), "</body></html>"]
    atomic_write_text(out_dir / "report.html", "\n".join(html))
