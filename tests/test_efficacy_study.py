"""benchmarks/efficacy_study.py reuses a finished model or attack only where every setting that decides it matches."""

import json
import os
import shutil
from pathlib import Path

import pytest

from mima.benchmark import Benchmark, BenchmarkConfig
from mima.data.concepts import load_concepts
from mima.immunize.config import ImmunizeConfig


@pytest.fixture(scope="module")
def study(benchmark_script):
    return benchmark_script("efficacy_study")


BASE = {"targets": ["toy:stripes"], "non_targets": ["toy:waves"], "methods": ["mima"], "attacks": ["lora"],
        "attack": {"steps": 30}}


def _finished_benchmark(study, folder: Path, overrides: dict, drop: str | None = None) -> None:
    """A benchmark folder whose `none` and `mima` models and their LoRA attacks on both concepts are finished;
    the models' records lack the field `drop`, as if written before it existed."""
    config = study.variant_config(BASE, overrides, seed=0)
    folder.mkdir(parents=True)
    config.save_json(folder / "benchmark_config.json")
    for piece in Benchmark(config, folder).immunization_pieces(load_concepts(list(config.targets))):
        made_with = piece.config.to_dict()
        made_with.pop(drop, None)
        piece.out.mkdir(parents=True)
        (piece.out / "immunization.json").write_text(json.dumps({"config": made_with}))
    for attack in _attack_pieces(config, folder):
        attack.out.mkdir(parents=True)
        runner = attack.runner
        record = {"config": attack.config.to_dict(), "model": runner.model, "concept": runner.concept.name}
        (attack.out / "attack.json").write_text(json.dumps(record))


def _attack_pieces(config, folder: Path) -> list:
    """The benchmark's attack runs of its `none` and `mima` models."""
    models = {method: folder / "models" / method / "model" for method in ("none", "mima")}
    concepts = load_concepts(list(config.targets + config.non_targets))
    return Benchmark(config, folder)._attack_pieces(models, concepts)[0]


def _linked(study, out: Path, overrides: dict, seed: int = 0) -> set[str]:
    folder = out / "new" / f"seed{seed}"
    config = study.variant_config(BASE, overrides, seed)
    study.link_finished(config, folder, study.finished_pieces(out))
    return {str(p.parent.relative_to(folder)) for p in folder.rglob("*.json")}


def test_a_variant_of_the_attacks_only_reuses_the_immunized_models(study, tmp_path):
    _finished_benchmark(study, tmp_path / "defaults" / "seed0", {})
    linked = _linked(study, tmp_path, {"attack": {"steps": 60}})
    assert linked == {"models/none", "models/mima"}
    source = tmp_path / "defaults" / "seed0" / "models" / "mima" / "immunization.json"
    linked_copy = tmp_path / "new" / "seed0" / "models" / "mima" / "immunization.json"
    assert os.stat(linked_copy).st_ino == os.stat(source).st_ino


def test_an_added_attack_variant_reuses_the_other_attacks_runs_but_not_a_differently_scaled_namesake(study,
                                                                                                       tmp_path):
    _finished_benchmark(study, tmp_path / "defaults" / "seed0", {})
    strong = {"name": "lora-strong", "method": "lora", "lr_scale": 3, "steps_scale": 2}
    linked = _linked(study, tmp_path, {"attacks": ["lora", strong]})
    assert linked == {"models/none", "models/mima", *(f"attacks/{m}/lora/{c}/seed0" for m in ("none", "mima")
                                                        for c in ("stripes", "waves"))}
    for method in ("none", "mima"):  # as if the strong variant had finished there too
        for concept in ("stripes", "waves"):
            run = tmp_path / "new" / "seed0" / "attacks" / method / "lora-strong" / concept / "seed0"
            run.mkdir(parents=True)
            (run / "attack.json").write_text(json.dumps({"model": "elsewhere"}))
    new_config = study.variant_config(BASE, {"attacks": ["lora", strong]}, 0)
    new_config.save_json(tmp_path / "new" / "seed0" / "benchmark_config.json")
    folder = tmp_path / "other" / "seed0"
    for scale, expected in ((3, 4), (2, 0)):
        config = study.variant_config(BASE, {"attacks": [{**strong, "lr_scale": scale}]}, 0)
        shutil.rmtree(folder, ignore_errors=True)
        study.link_finished(config, folder, study.finished_pieces(tmp_path))
        assert len(list(folder.glob("attacks/*/lora-strong/*/seed0/attack.json"))) == expected


def test_a_variant_of_the_immunization_reuses_only_the_reference(study, tmp_path):
    _finished_benchmark(study, tmp_path / "defaults" / "seed0", {})
    linked = _linked(study, tmp_path, {"immunize": {"retain_weight": 0.0}})
    assert linked == {"models/none", "attacks/none/lora/stripes/seed0", "attacks/none/lora/waves/seed0"}
    # The linked runs attacked the other folder's copy of the same model: the benchmark takes them as its own
    # (their records now name its copy; the source's records are untouched).
    config = study.variant_config(BASE, {"immunize": {"retain_weight": 0.0}}, 0)
    reference = [p for p in _attack_pieces(config, tmp_path / "new" / "seed0") if "/none/" in str(p.out)]
    assert len(reference) == 2 and all(piece.finished() for piece in reference)
    source = json.loads((tmp_path / "defaults" / "seed0" / "attacks/none/lora/stripes/seed0/attack.json").read_text())
    assert source["model"] == str(tmp_path / "defaults" / "seed0" / "models" / "none" / "model")


def test_identical_settings_reuse_everything_and_another_seed_nothing(study, tmp_path):
    _finished_benchmark(study, tmp_path / "defaults" / "seed0", {})
    default = ImmunizeConfig().resolved("retain_weight")
    assert len(_linked(study, tmp_path, {"immunize": {"retain_weight": default}})) == 6  # the default, spelled out
    shutil.rmtree(tmp_path / "new")
    assert len(_linked(study, tmp_path, {"immunize": {"save_every": 7}})) == 6  # decides nothing, as in a benchmark
    assert _linked(study, tmp_path, {}, seed=1) == set()


def test_a_record_from_before_a_changed_default_is_keyed_by_what_it_was_made_with(study, tmp_path):
    _finished_benchmark(study, tmp_path / "old" / "seed0", {"immunize": {"inner_clip": 0.0}}, drop="inner_clip")
    assert "models/mima" not in _linked(study, tmp_path, {})  # today's default clips: another model
    shutil.rmtree(tmp_path / "new")
    assert "models/mima" in _linked(study, tmp_path, {"immunize": {"inner_clip": 0.0}})


def test_other_targets_share_nothing(study, tmp_path):
    _finished_benchmark(study, tmp_path / "defaults" / "seed0", {})
    assert _linked(study, tmp_path, {"targets": ["toy:checker"]}) == set()


def test_variant_config_merges_immunize_overrides_and_sets_the_seed(study):
    config = study.variant_config({**BASE, "immunize": {"steps": 5}}, {"immunize": {"ridge": 0.1}}, seed=3)
    assert isinstance(config, BenchmarkConfig)
    assert config.immunize == {"steps": 5, "ridge": 0.1, "seed": 3}
    assert config.seeds == (3,)


def test_attack_seeds_attack_each_model_several_times_and_keep_the_first_seed(study, tmp_path):
    config = study.variant_config({**BASE, "attack_seeds": 3}, {}, seed=1)
    assert config.seeds == (1, 101, 201)
    assert config.immunize["seed"] == 1
    assert study.variant_config(BASE, {"attack_seeds": 2}, seed=0).seeds == (0, 100)
    _finished_benchmark(study, tmp_path / "defaults" / "seed0", {})  # attacked once, with seed 0
    linked = _linked(study, tmp_path, {"attack_seeds": 2})
    assert "attacks/mima/lora/stripes/seed0" in linked and not any(path.endswith("seed100") for path in linked)


def _metrics(msgr: float, stripes_sgr: float, rate_before: float, waves_before: float = 0.9) -> dict:
    """A benchmark's metrics.json, cut down to what the study summary reads: the judge's rates before attack, and
    efficientnet's similarities (here a tenth of the rates, waves noise-like on the immunized model: 0.3)."""
    def before(stripes: float, waves: float, waves_similarity: float) -> dict:
        return {"toy-judge": {"stripes": {"success_rate": stripes, "similarity": 0.5},
                              "waves": {"success_rate": waves, "similarity": 0.5}},
                "efficientnet-lite0": {"stripes": {"success_rate": None, "similarity": stripes / 10},
                                       "waves": {"success_rate": None, "similarity": waves_similarity}}}

    row = {"msgr": msgr, "sgr": {"stripes": stripes_sgr}, "non_target_sgr": {"waves": 1.0}}
    return {"summary": {"mima": {"lora": {"toy-judge": row, "efficientnet-lite0": dict(row)}}},
            "before_attack": {"attack": "lora", "models": {"mima": before(rate_before, waves_before, 0.3),
                                                           "none": before(0.0, 1.0, 0.8)}}}


def test_summary_averages_seeds_and_reports_what_each_encoder_sees_before_attack(study, tmp_path):
    table = study.summarize({"defaults": {0: _metrics(20.0, 10.0, 0.0), 1: _metrics(30.0, 30.0, 0.5)}})
    row = table["defaults"]["mima"]["lora"]["toy-judge"]
    assert row["msgr"] == [20.0, 30.0] and row["sgr"] == {"stripes": [10.0, 30.0]}
    assert row["target_before"] == {"stripes": [(0.0, 0.0), (0.5, 0.0)]}
    assert row["non_target_before"] == {"waves": [(0.9, 1.0), (0.9, 1.0)]}
    assert table["defaults"]["mima"]["lora"]["efficientnet-lite0"]["non_target_before"] == {"waves": [(0.3, 0.8)] * 2}
    study.write_summary(table, tmp_path)
    lines = (tmp_path / "summary.md").read_text().splitlines()
    judge, efficientnet = (next(x for x in lines if f"| mima | lora | {e} |" in x)
                           for e in ("toy-judge", "efficientnet-lite0"))
    assert "| 25.0 (20.0, 30.0) | 20.0 |" in judge  # the mean MSGR, per seed, and the weakest target's mean SGR
    assert "| waves 90 / 100 (90 / 100; 90 / 100) | stripes 25 / 0 (0 / 0; 50 / 0) |" in judge
    assert "| waves 0.30 / 0.80 (0.30 / 0.80; 0.30 / 0.80) | stripes 0.03 / 0.00 (0.00 / 0.00; 0.05 / 0.00) |" in (
        efficientnet)
    assert (tmp_path / "summary.png").stat().st_size > 0


def test_summary_reports_the_bystanders_drawn_before_attack(study, tmp_path):
    record = _metrics(20.0, 10.0, 0.0)
    for model, rate in (("mima", 0.25), ("none", 1.0)):  # rings: drawn by both models, never attacked
        record["before_attack"]["models"][model]["toy-judge"]["rings"] = {"success_rate": rate, "similarity": 0.5}
    table = study.summarize({"defaults": {0: record}})
    assert table["defaults"]["mima"]["lora"]["toy-judge"]["bystander_before"] == {"rings": [(0.25, 1.0)]}
    assert table["defaults"]["mima"]["lora"]["efficientnet-lite0"]["bystander_before"] == {}
    study.write_summary(table, tmp_path)
    line = next(x for x in (tmp_path / "summary.md").read_text().splitlines() if "| mima | lora | toy-judge |" in x)
    assert "| waves 90 / 100 | stripes 0 / 0 | rings 25 / 100 |" in line


def test_summary_shows_each_seeds_spread_over_attack_seeds(study, tmp_path):
    seeds = {0: _metrics(20.0, 10.0, 0.0), 1: _metrics(30.0, 30.0, 0.5)}
    seeds[0]["summary"]["mima"]["lora"]["toy-judge"].update(sgr_sd={"stripes": 4.3}, non_target_sgr_sd={"waves": 2.0},
                                                            between_runs={"waves": 7.4})
    table = study.summarize({"defaults": seeds})
    assert table["defaults"]["mima"]["lora"]["toy-judge"]["sgr_sd"] == {"stripes": [4.3, None]}  # seed 1: one attack
    study.write_summary(table, tmp_path)
    line = next(line for line in (tmp_path / "summary.md").read_text().splitlines() if "| mima | lora |" in line)
    assert "| stripes 20.0 (10.0 ±4.3, 30.0) | waves 1.0 (1.0 ±2.0, 1.0) [between runs 7.4] |" in line
    study.write_summary(study.summarize({"defaults": {0: seeds[0]}}), tmp_path)
    assert "| stripes 10.0 ±4.3 | waves 1.0 ±2.0 [between runs 7.4] |" in (tmp_path / "summary.md").read_text()
    study.write_summary(study.summarize({"defaults": {1: seeds[1]}}), tmp_path)
    assert "| waves 1.0 |" in (tmp_path / "summary.md").read_text()  # one attack run: nothing to compare


def test_the_summary_starts_with_the_worst_case_over_attacks(study, tmp_path):
    seeds = {0: _metrics(20.0, 10.0, 0.0), 1: _metrics(30.0, 30.0, 0.5)}
    for seed, record in seeds.items():  # a stronger attack: MSGR 10 and 14, mean 12
        row = dict(record["summary"]["mima"]["lora"]["toy-judge"], msgr=10.0 + 4 * seed)
        record["summary"]["mima"]["lora-strong"] = {"toy-judge": row}
    study.write_summary(study.summarize({"defaults": seeds}), tmp_path)
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert lines[0].startswith("| variant | method | encoder | worst-case MSGR |")
    assert lines[2] == "| defaults | mima | toy-judge | 12.0 | lora-strong | lora 25.0, lora-strong 12.0 |"


def test_tradeoff_points_pair_protection_with_the_non_targets_worst_case(study, tmp_path):
    table = study.summarize({"defaults": {0: _metrics(20.0, 10.0, 0.0), 1: _metrics(30.0, 30.0, 0.5, 0.6)}})
    points = study.tradeoff_points(table, ["defaults", "not-run"])
    assert points == {"defaults": pytest.approx({"msgr/toy-judge": 25.0, "non_target_sgr/toy-judge": 1.0,
                                                 "msgr/efficientnet-lite0": 25.0,
                                                 "non_target_sgr/efficientnet-lite0": 1.0,
                                                 "non_target_judge_before": 60.0})}  # the worse seed, not the mean
    study.write_summary(table, tmp_path, tradeoff=["defaults"])
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_collect_adds_each_models_upper_loss_trajectory(study, tmp_path):
    folder = tmp_path / "defaults" / "seed0"
    for method, log in (("none", []), ("mima", [{"upper/a": 0.2, "upper/b": 0.4, "retain": 0.3},
                                                {"upper/a": 30.0, "upper/b": 40.0, "retain": 3.5}])):
        (folder / "models" / method).mkdir(parents=True)
        (folder / "models" / method / "immunization.json").write_text(json.dumps({"log": log}))
    (folder / "report").mkdir()
    (folder / "report" / "metrics.json").write_text(json.dumps(_metrics(20.0, 10.0, 0.0)))
    results = study.collect({"variants": {"defaults": {}}, "seeds": [0]}, tmp_path)
    losses = results["defaults"][0]["immunization_losses"]
    assert set(losses) == {"mima"} and abs(losses["mima"]["upper_first"] - 0.3) < 1e-12
    assert losses["mima"]["upper_last"] == 35.0 and losses["mima"]["retain_last"] == 3.5
    study.write_summary(study.summarize(results), tmp_path)
    assert "| 0.30 -> 35.00 (3.50) |" in (tmp_path / "summary.md").read_text()
