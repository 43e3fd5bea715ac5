"""The efficacy study behind docs/efficacy.md: `mima benchmark` over variants of the immunization settings.

A study YAML names a base benchmark (any `BenchmarkConfig` fields), the seeds, and variants that override the
base's `immunize` settings (or any other field). Each (variant, seed) is one benchmark folder,
`OUT/<variant>/seed<k>`; the seed sets both the immunization's and the attacks' seed (with `attack_seeds: n`,
each model is attacked n times, and the report averages them). A finished piece is
never computed twice: before a benchmark runs, every immunized model and attack that another folder under OUT
finished with the same settings is hard-linked into it (the un-immunized reference `none` depends only on the
model, setting, targets and seed, so every variant shares it; a variant that changes only the attacks reuses
the immunized models). Everything resumes like `mima benchmark`.

    python benchmarks/efficacy_study.py STUDY.yaml --out runs/study [--only VARIANT ...] [--seeds 0 ...]
                                        [--threads 1] [--jobs 2]

Writes OUT/summary.md and OUT/summary.json: first, per variant, method and encoder, the worst case over the attacks
(the lowest seed-mean MSGR and its attack, then every attack's); then per variant, method, attack and encoder, the
mean over seeds (and the per-seed values) of MSGR, every target's SGR, the non-target SGR, and what the encoder
sees before any attack (immunized vs base model; the toy judge's rate, another encoder's similarity S) on the
non-targets (do they stay? the judge also counts a sample of the right colours drawn as noise), on the targets (do
they stay erased?) and on the benchmark's bystanders (drawn, never attacked: do they stay?). A study's `attacks:`
may name variants (`mima.attacks.variants`), e.g. a stronger or a fresh-token LoRA beside the plain one.
With a `tradeoff` list of variants in the study, OUT/tradeoff.png plots MIMA's MSGR against the non-target's
|SGR| and judge rate before attack, one point per listed variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from statistics import mean

import yaml

from mima.benchmark import Benchmark, BenchmarkConfig
from mima.executors import LocalExecutor
from mima.utils.io import atomic_write_text

REFERENCE = "none"
JUDGE = "toy-judge"  # a classifier of the toy concepts: its rate of a concept, where other encoders give S
ATTACK_SEED_STRIDE = 100  # attack seeds of immunization seed k: k, k + 100, ...


def variant_config(base: dict, overrides: dict, seed: int) -> BenchmarkConfig:
    """The benchmark of one (variant, seed): the seed immunizes, and seeds the attacks; with `attack_seeds: n` (in
    the base or the variant) each model is attacked n times, with seeds seed, seed + 100, ..., and the report
    averages them (an attack's own randomness moves a single run's SGR by several points)."""
    immunize = {**base.get("immunize", {}), **overrides.get("immunize", {}), "seed": seed}
    fields = {**base, **{k: v for k, v in overrides.items() if k != "immunize"}, "immunize": immunize}
    attack_seeds = fields.pop("attack_seeds", 1)
    return BenchmarkConfig.from_dict({**fields, "seeds": [seed + ATTACK_SEED_STRIDE * i for i in range(attack_seeds)]})


def _model_key(config: BenchmarkConfig, method: str, recorded: dict | None = None) -> str:
    """What decides an immunized model: the method's deciding fields of the ImmunizeConfig it is made with,
    as `config` resolves it or, for a finished model, as `recorded` (the `none` reference, erased in relearn,
    ignores the bilevel settings)."""
    from mima.data.concepts import load_concepts
    from mima.immunize import ImmunizeConfig, immunizers

    if recorded is None:
        pieces = Benchmark(config, Path()).immunization_pieces(load_concepts(list(config.targets)))
        made_with = next(p for p in pieces if p.config.method == method).config
    else:
        made_with = ImmunizeConfig.from_record(recorded)
    deciding = set(immunizers.get(method).deciding_fields(made_with))
    settings = {k: v for k, v in made_with.to_dict().items() if k in deciding}
    return json.dumps([config.model, config.setting, list(config.targets), method, settings], sort_keys=True)


def _attack_keys(config: BenchmarkConfig) -> dict[str, str]:
    """What decides each attack variant's runs, by variant name: the shared `attack:` settings and the variant's
    own (method, scales, overrides)."""
    from mima.attacks import AttackConfig

    shared = AttackConfig.from_dict(config.attack).to_dict()
    return {v.name: json.dumps([shared, v.method, v.lr_scale, v.steps_scale, dict(v.overrides)], sort_keys=True)
            for v in config.attack_variants()}


def finished_pieces(out: Path) -> dict[tuple, Path]:
    """Every finished model and attack under OUT, by what decides it: {(model key,) or (model key, attack
    settings, attack, concept, seed): folder}."""
    pieces: dict[tuple, Path] = {}
    for config_path in sorted(out.glob("*/seed*/benchmark_config.json")):
        folder = config_path.parent
        config = BenchmarkConfig.load_json(config_path)
        for model in sorted((folder / "models").glob("*/immunization.json")):
            method = model.parent.name
            key = _model_key(config, method, json.loads(model.read_text())["config"])
            pieces.setdefault((key,), model.parent)
            attack_keys = _attack_keys(config)
            for attack in sorted((folder / "attacks" / method).glob("*/*/seed*/attack.json")):
                run = attack.parent
                variant = run.parent.parent.name
                if variant in attack_keys:
                    pieces.setdefault((key, attack_keys[variant], variant, run.parent.name, run.name), run)
    return pieces


def link_finished(config: BenchmarkConfig, folder: Path, pieces: dict[tuple, Path]) -> int:
    """Hard-link into `folder` every finished piece it needs and lacks; returns how many were linked."""
    from mima.data.concepts import load_concepts

    concept_names = [c.name for c in load_concepts(list(config.targets + config.non_targets))]
    attack_keys, linked = _attack_keys(config), 0
    for method in (REFERENCE, *config.methods):
        key = _model_key(config, method)
        wanted = {(key,): folder / "models" / method}
        for attack, attack_key in attack_keys.items():
            for name in concept_names:
                for seed in config.seeds:
                    wanted[(key, attack_key, attack, name, f"seed{seed}")] = (
                        folder / "attacks" / method / attack / name / f"seed{seed}")
        for piece, target in wanted.items():
            source = pieces.get(piece)
            if source is not None and source != target and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(source, target, copy_function=os.link)
                if len(piece) > 1:  # an attack run: it attacked this folder's copy of the same model
                    _repoint(target, folder / "models" / method / "model")
                linked += 1
    return linked


def _repoint(run: Path, model: Path) -> None:
    """Make a linked attack run's record name `model` (a new file: the source's record stays as it was)."""
    record_path = run / "attack.json"
    record = json.loads(record_path.read_text())
    record["model"] = str(model)
    record_path.unlink()  # a hard link to the source's record: writing through it would change both
    atomic_write_text(record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def run_study(study: dict, out: Path, only: list[str] | None, seeds: list[int] | None, jobs: int = 1) -> None:
    for name, overrides in study["variants"].items():
        if only and name not in only:
            continue
        for seed in seeds or study["seeds"]:
            config = variant_config(study["base"], overrides or {}, seed)
            folder = out / name / f"seed{seed}"
            linked = link_finished(config, folder, finished_pieces(out))
            if linked:
                print(f"{name}/seed{seed}: reusing {linked} finished models and attacks")
            folder.mkdir(parents=True, exist_ok=True)
            config.save_json(folder / "benchmark_config.json")
            Benchmark(config, folder, executor=LocalExecutor(jobs)).run()


def immunization_losses(folder: Path) -> dict[str, dict[str, float | None]]:
    """Per immunized model of a benchmark folder: the mean upper loss (after the simulated attack) at the first and
    the last outer step, and the last retain loss."""
    def upper(entry: dict) -> float:
        values = [v for k, v in entry.items() if k.startswith("upper/")]
        return sum(values) / len(values)

    losses = {}
    for record in sorted(folder.glob("models/*/immunization.json")):
        log = json.loads(record.read_text())["log"]
        if log:  # `none` has no outer steps
            losses[record.parent.name] = {"upper_first": upper(log[0]), "upper_last": upper(log[-1]),
                                          "retain_last": log[-1].get("retain")}
    return losses


def collect(study: dict, out: Path) -> dict:
    """Every finished (variant, seed) report of the study, {variant: {seed: metrics.json}}, with the immunizations'
    losses under `immunization_losses`."""
    results: dict = {}
    for name in study["variants"]:
        for seed in study["seeds"]:
            folder = out / name / f"seed{seed}"
            metrics = folder / "report" / "metrics.json"
            if metrics.is_file():
                record = json.loads(metrics.read_text())
                results.setdefault(name, {})[seed] = {**record, "immunization_losses": immunization_losses(folder)}
    return results


def _before_attack(record: dict, method: str, encoder: str, concept: str) -> tuple[float, float] | None:
    """(immunized, base) before any attack step (the report's `before_attack`, absent when every attack of the
    benchmark rewrites the prompt): the toy judge's rate of the concept, another encoder's similarity S."""
    models = record.get("before_attack", {}).get("models", {})
    key = "success_rate" if encoder == JUDGE else "similarity"
    values = [models.get(m, {}).get(encoder, {}).get(concept, {}).get(key) for m in (method, "none")]
    return None if None in values else (values[0], values[1])


def summarize(results: dict) -> dict:
    """Per variant, method, attack and encoder: seed means of MSGR, SGRs and values before attack."""
    table: dict = {}
    for variant, by_seed in results.items():
        for record in by_seed.values():
            for method, by_attack in record["summary"].items():
                for attack, by_encoder in by_attack.items():
                    for encoder, metrics in by_encoder.items():
                        row = table.setdefault(variant, {}).setdefault(method, {}).setdefault(attack, {}).setdefault(
                            encoder, {"msgr": [], "sgr": {}, "non_target_sgr": {}, "sgr_sd": {},
                                      "non_target_sgr_sd": {}, "between_runs": {}, "non_target_before": {},
                                      "target_before": {}, "bystander_before": {}, "losses": []})
                        _add_seed(row, record, method, encoder, metrics)
    return table


def _add_seed(row: dict, record: dict, method: str, encoder: str, metrics: dict) -> None:
    """One seed's numbers of one (method, attack, encoder) into its row of the table."""
    row["msgr"].append(metrics["msgr"])
    if method in record.get("immunization_losses", {}):
        row["losses"].append(record["immunization_losses"][method])
    for sgr_key, before_key in (("sgr", "target_before"), ("non_target_sgr", "non_target_before")):
        for concept, value in metrics[sgr_key].items():
            row[sgr_key].setdefault(concept, []).append(value)
            spread = metrics.get(f"{sgr_key}_sd", {}).get(concept)  # over attack seeds
            row[f"{sgr_key}_sd"].setdefault(concept, []).append(spread)
            before = _before_attack(record, method, encoder, concept)
            if before is not None:
                row[before_key].setdefault(concept, []).append(before)
    drawn = record.get("before_attack", {}).get("models", {}).get(method, {}).get(encoder, {})
    for concept in sorted(drawn.keys() - metrics["sgr"].keys() - metrics["non_target_sgr"].keys()):  # never attacked
        if (before := _before_attack(record, method, encoder, concept)) is not None:
            row["bystander_before"].setdefault(concept, []).append(before)
    for concept, value in metrics.get("between_runs", {}).items():
        if value is not None:
            row["between_runs"].setdefault(concept, []).append(value)


def _fmt(values: list[float], spreads: list[float | None] | None = None) -> str:
    """The mean over seeds, then each seed's value when there are several; each with its standard deviation over
    attack seeds (± sd) when it has one."""
    each = [f"{v:.1f}" + ("" if sd is None else f" ±{sd:.1f}")
            for v, sd in zip(values, spreads or [None] * len(values), strict=True)]
    return each[0] if len(values) == 1 else f"{mean(values):.1f} ({', '.join(each)})"


def _between(row: dict, concept: str) -> str:
    """The non-target's |SGR| between two un-immunized runs (`between_runs`), when it has several attack seeds."""
    values = row["between_runs"].get(concept)
    return f" [between runs {_fmt(values)}]" if values else ""


def _before(by_concept: dict, judge: bool) -> str:
    """Values before attack as "concept immunized / base", per seed when there are several: the judge's rates in %,
    similarities as they are."""
    def pair(values: list) -> str:
        return " / ".join(f"{100 * mean(v[i] for v in values):.0f}" if judge else f"{mean(v[i] for v in values):.2f}"
                          for i in (0, 1))

    return ", ".join(f"{c} {pair(v)}" + (f" ({'; '.join(pair([x]) for x in v)})" if len(v) > 1 else "")
                     for c, v in by_concept.items())


def _losses(per_seed: list[dict]) -> str:
    def one(x: dict) -> str:
        retain = "" if x["retain_last"] is None else f" ({x['retain_last']:.2f})"
        return f"{x['upper_first']:.2f} -> {x['upper_last']:.2f}{retain}"

    return "; ".join(one(x) for x in per_seed)


def tradeoff_points(table: dict, variants: list[str], method: str = "mima") -> dict[str, dict[str, float]]:
    """Per variant (first attack): the method's mean MSGR and the non-targets' worst mean |SGR| per encoder, and
    the lowest toy-judge rate before attack of a non-target over seeds (immunized model, %)."""
    points = {}
    for variant in variants:
        by_attack = table.get(variant, {}).get(method)
        if not by_attack:
            continue
        by_encoder = next(iter(by_attack.values()))
        point = {}
        for encoder, row in by_encoder.items():
            point[f"msgr/{encoder}"] = mean(row["msgr"])
            point[f"non_target_sgr/{encoder}"] = max(abs(mean(v)) for v in row["non_target_sgr"].values())
            rates = row["non_target_before"] if encoder == JUDGE else {}
            if rates:
                point["non_target_judge_before"] = 100 * min(r[0] for v in rates.values() for r in v)
        points[variant] = point
    return points


def plot_tradeoff(points: dict[str, dict[str, float]], path: Path) -> None:
    """Protection against preservation, one point per variant: MSGR against the non-target's |SGR|
    (efficientnet) and against its lowest judge rate before attack (toy judge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("msgr/efficientnet-lite0", "non_target_sgr/efficientnet-lite0", "non-target |SGR| % (efficientnet)", 5),
              (f"msgr/{JUDGE}", "non_target_judge_before", "non-target judge rate before attack %, lowest seed", 90))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, (x_key, y_key, y_label, bar) in zip(axes, panels, strict=True):
        for i, (variant, point) in enumerate(points.items()):
            if x_key in point and y_key in point:  # shrinking sizes keep variants on one spot visible
                ax.scatter(point[x_key], point[y_key], s=max(160 - 15 * i, 20), marker="osD^vP*X<>"[i % 10],
                           color=f"C{i % 10}", label=variant, edgecolors="black", linewidths=0.5)
        ax.axhline(bar, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel(f"MSGR % ({x_key.split('/')[1]}, higher: stronger)")
        ax.set_ylabel(y_label)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def worst_case_lines(table: dict) -> list[str]:
    """Per variant, method and encoder: the attack with the lowest seed-mean MSGR (the one the immunization slows
    least), then every attack's, as a markdown table."""
    lines = ["| variant | method | encoder | worst-case MSGR | worst attack | MSGR per attack |", "|" + "---|" * 6]
    for variant, by_method in table.items():
        for method, by_attack in by_method.items():
            for encoder in dict.fromkeys(e for by_encoder in by_attack.values() for e in by_encoder):
                msgrs = {attack: mean(m for m in by_encoder[encoder]["msgr"] if m is not None)
                         for attack, by_encoder in by_attack.items()
                         if encoder in by_encoder and any(m is not None for m in by_encoder[encoder]["msgr"])}
                if msgrs:
                    worst = min(msgrs, key=msgrs.__getitem__)
                    each = ", ".join(f"{attack} {value:.1f}" for attack, value in msgrs.items())
                    lines.append(f"| {variant} | {method} | {encoder} | {msgrs[worst]:.1f} | {worst} | {each} |")
    return lines


def write_summary(table: dict, out: Path, tradeoff: list[str] | None = None) -> None:
    lines = [*worst_case_lines(table), ""]
    lines += ["| variant | method | attack | encoder | MSGR | min target SGR | targets' SGR (± sd over attack seeds) |"
             " non-target SGR [|SGR| between two un-immunized runs] |"
             " non-target before attack (immunized / base: judge rate %, else S) | targets' before attack |"
             " bystanders before attack | upper loss, first -> last outer step (last retain loss) |",
             "|" + "---|" * 12]
    for variant, by_method in table.items():
        for method, by_attack in by_method.items():
            for attack, by_encoder in by_attack.items():
                for encoder, row in by_encoder.items():
                    targets = ", ".join(f"{c} {_fmt(v, row['sgr_sd'].get(c))}" for c, v in row["sgr"].items())
                    worst = min(mean(v) for v in row["sgr"].values())
                    others = ", ".join(f"{c} {_fmt(v, row['non_target_sgr_sd'].get(c))}" + _between(row, c)
                                       for c, v in row["non_target_sgr"].items())
                    before = [_before(row[key], encoder == JUDGE)
                              for key in ("non_target_before", "target_before", "bystander_before")]
                    lines.append(f"| {variant} | {method} | {attack} | {encoder} | {_fmt(row['msgr'])} | "
                                 f"{worst:.1f} | {targets} | {others} | {' | '.join(before)} | "
                                 f"{_losses(row['losses'])} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    plot_summary(table, out / "summary.png")
    if tradeoff:
        plot_tradeoff(tradeoff_points(table, tradeoff), out / "tradeoff.png")


def plot_summary(table: dict, path: Path) -> None:
    """Grouped bars: MSGR and non-target |SGR| per variant and method, one panel per encoder (first attack)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = sorted({e for v in table.values() for m in v.values() for a in m.values() for e in a})
    methods = sorted({m for v in table.values() for m in v})
    fig, axes = plt.subplots(2, len(encoders), figsize=(6 * len(encoders), 7), squeeze=False)
    width = 0.8 / len(methods)
    for col, encoder in enumerate(encoders):
        for i, method in enumerate(methods):
            rows = [next(iter(by_method[method].values())).get(encoder) if method in by_method else None
                    for by_method in table.values()]
            x = [j + i * width for j in range(len(table))]
            msgr = [mean(r["msgr"]) if r else 0 for r in rows]
            leak = [max(abs(mean(v)) for v in r["non_target_sgr"].values()) if r and r["non_target_sgr"] else 0
                    for r in rows]
            axes[0][col].bar(x, msgr, width, label=method)
            axes[1][col].bar(x, leak, width, label=method)
        for row, title in enumerate(("MSGR (higher: stronger)", "max non-target |SGR| (near 0: preserved)")):
            axes[row][col].set_title(f"{encoder}: {title}")
            axes[row][col].set_xticks([j + 0.4 - width / 2 for j in range(len(table))], list(table), rotation=30,
                                      ha="right", fontsize=8)
        axes[1][col].axhline(5, color="gray", linestyle="--", linewidth=1)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="study YAML: base, seeds, variants")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", help="run only these variants (the summary covers what exists)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these of the study's seeds")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--jobs", type=int, default=1, help="pieces (immunizations, attack runs) at a time")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    study = yaml.safe_load(args.study.read_text())
    run_study(study, args.out, args.only, args.seeds, args.jobs)
    write_summary(summarize(collect(study, args.out)), args.out, study.get("tradeoff"))
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
