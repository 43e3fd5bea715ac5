"""`mima benchmark` end to end on the tiny model: every piece, the report, and a resumed re-run that redoes nothing."""

import json

import numpy as np
import pytest
import torch
import yaml

from mima.cli import main
from mima.data.image_folder import read_image_folder


def test_benchmark_writes_a_complete_report_and_reruns_without_new_work(tiny_model_dir, tmp_path, capfd, monkeypatch):
    """Attacks first run as two parallel jobs (only the parent draws a progress bar); a serial re-run of one piece
    reproduces it exactly."""
    config = {
        "model": str(tiny_model_dir), "targets": ["toy:stripes"], "non_targets": ["toy:star"], "methods": ["mima"],
        "bystanders": ["toy:rings"], "attacks": ["lora"], "encoders": ["toy-judge"],
        "immunize": {"steps": 1, "n_images": 4, "n_class_images": 2, "batch_size": 2, "n_bank_images": 3},
        "attack": {"steps": 2, "save_every": 1, "eval_images": 2, "sampling_steps": 2, "n_images": 4},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["benchmark", "--config", str(path), "--out", str(out), "--jobs", "2"]) == 0, capfd.readouterr().err
    bars = capfd.readouterr().err
    assert "attacks (2 jobs)" in bars and "attack (lora)" not in bars, bars
    report = out / "report"
    for name in ("report.html", "report.md", "metrics.json", "figures/similarity-lora-toy-judge.png",
                 "grids/lora-stripes.png", "grids/lora-star.png"):
        assert (report / name).is_file(), name
    summary = json.loads((report / "metrics.json").read_text())["summary"]["mima"]["lora"]["toy-judge"]
    assert set(summary) >= {"msgr", "mrsgr", "sgr", "non_target_sgr"}
    assert set(summary["sgr"]) == {"stripes"} and set(summary["non_target_sgr"]) == {"star"}
    html = (report / "report.html").read_text()
    assert "<table id='summary'>" in html and html.count("data:image/png;base64,") == 4  # a figure, 3 grids
    record = json.loads((report / "metrics.json").read_text())
    before = record["before_attack"]
    assert before["attack"] == "lora" and set(before["models"]) == {"none", "mima"}
    star = record["evaluations"]["mima"]["lora"]["0"]["encoders"]["toy-judge"]["concepts"]["star"]
    assert before["models"]["mima"]["toy-judge"]["star"] == {"similarity": star["s_with"][0],
                                                            "success_rate": star["asr_with"][0]}
    assert before["models"]["none"]["toy-judge"]["star"]["similarity"] == star["s_without"][0]
    assert "<table id='before-attack'>" in html and "star (non-target)" in (report / "report.md").read_text()
    assert "rings (bystander)" in (report / "report.md").read_text()
    assert (report / "grids/before-attack-rings.png").is_file()
    _assert_bystanders_are_drawn_as_step_0_and_scored(out, config, before)
    recorded = record["timings_s"]["recorded by the pieces"]
    elapsed = [json.loads((out / f"models/{m}/immunization.json").read_text())["elapsed_s"] for m in ("none", "mima")]
    assert recorded["immunization"] == sum(elapsed) and recorded["attacks"] > 0 and recorded["bystanders"] > 0
    shared = out / "class-images" / "class-a-painting"  # drawn once, read by both models' immunizations
    assert len(read_image_folder(shared)[0]) == 2 and not list(out.glob("models/*/data/class-*"))
    for method in ("none", "mima"):
        concept = json.loads((out / f"models/{method}/immunization.json").read_text())["concepts"][0]
        assert concept["class_images"] == str(shared)
    bank = out / "bank-prior"  # the bank prior's images, drawn once for every immunization that takes it
    assert len(read_image_folder(bank)[0]) == 3 and not list(out.glob("models/*/data/bank-prior"))
    assert "bank_prior" in json.loads((out / "models/mima/immunization.json").read_text())["log"][0]
    runs = sorted(out.glob("attacks/*/lora/*/seed0/attack.json")) + sorted(out.glob("models/*/immunization.json"))
    runs += [shared / "metadata.csv", bank / "metadata.csv", *sorted(out.glob("bystanders/*/rings/*/drawing.json"))]
    assert len(runs) == 10  # 2 models x 2 concepts attacked, the 2 models, class and bank images, 2 bystanders
    written = [r.stat().st_mtime_ns for r in runs]
    capfd.readouterr()
    monkeypatch.setattr("mima.evaluate.summary.DRAWN_SHARE", 2.0)  # every non-target now counts as damaged
    assert main(["benchmark", "--config", str(path), "--out", str(out)]) == 0
    assert [r.stat().st_mtime_ns for r in runs] == written
    rerun = json.loads((report / "metrics.json").read_text())
    drawn = before["models"]["mima"]["toy-judge"]["star"]["similarity"]
    reference = before["models"]["none"]["toy-judge"]["star"]["similarity"]
    rings = [rerun["before_attack"]["models"][m]["toy-judge"]["rings"]["similarity"] for m in ("mima", "none")]
    warning = (f"mima draws 2 concept(s) it should keep under 2 of none's similarity before any attack (toy-judge): "
               f"star (non-target) {drawn:.2f} against {reference:.2f}, rings {rings[0]:.2f} against {rings[1]:.2f}")
    assert rerun["warnings"] == [warning] and record["warnings"] == []
    assert f"mima: warning: {warning}\n" in capfd.readouterr().out
    assert f"**Warning:** {warning}." in (report / "report.md").read_text()
    assert rerun["summary"]["mima"]["lora"]["toy-judge"] == summary
    assert rerun["timings_s"]["recorded by the pieces"] == recorded  # the pieces' own times survive a resumed run
    config["immunize"]["save_every"] = 7  # a checkpoint period decides nothing: still reused
    config["immunize"]["inner_clip"] = 0.5  # decides mima's model, not the erased `none` one
    path.write_text(yaml.safe_dump(config))
    capfd.readouterr()
    recorded_config = (out / "benchmark_config.json").read_text()
    assert main(["benchmark", "--config", str(path), "--out", str(out)]) == 2
    assert (out / "benchmark_config.json").read_text() == recorded_config  # a refused run rewrites nothing
    error = capfd.readouterr().err.strip()
    assert error.count("\n") == 0 and "models/mima' was made with other settings (inner_clip: 1.0 -> 0.5)" in error
    assert [r.stat().st_mtime_ns for r in runs] == written
    config["immunize"].pop("inner_clip")
    path.write_text(yaml.safe_dump(config))
    piece = out / "attacks/mima/lora/star/seed0"
    parallel = piece.rename(tmp_path / "parallel")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))  # as each of the 2 workers had: float sums depend on the split
    try:
        assert main(["benchmark", "--config", str(path), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    for step in ("step_0", "step_2"):
        serial_images, parallel_images = (read_image_folder(run / "samples" / step)[0] for run in (piece, parallel))
        assert [np.asarray(i).tolist() for i in serial_images] == [np.asarray(i).tolist() for i in parallel_images]


def test_named_attack_variants_run_side_by_side_and_the_report_shows_the_worst_case_first(tiny_model_dir, tmp_path):
    fresh = {"name": "lora-fresh", "method": "lora", "prompt": "fresh-token", "lr_scale": 3, "steps_scale": 2}
    config = {
        "model": str(tiny_model_dir), "targets": ["toy:stripes"], "non_targets": [], "methods": ["mima"],
        "attacks": ["lora", fresh], "encoders": ["toy-judge"],
        "immunize": {"steps": 1, "n_images": 4, "n_class_images": 2, "batch_size": 2},
        "attack": {"steps": 1, "save_every": 1, "eval_images": 2, "sampling_steps": 2, "n_images": 4},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["benchmark", "--config", str(path), "--out", str(out)]) == 0
    from mima.attacks import attacks

    run = json.loads((out / "attacks/mima/lora-fresh/stripes/seed0/attack.json").read_text())
    assert run["prompt_mode"] == "fresh-token" and run["config"]["steps"] == 2
    assert run["config"]["lr"] == pytest.approx(3 * attacks.get("lora").default_lr)
    assert json.loads((out / "attacks/none/lora/stripes/seed0/attack.json").read_text())["config"]["steps"] == 1
    record = json.loads((out / "report" / "metrics.json").read_text())
    per_attack = {a: record["summary"]["mima"][a]["toy-judge"]["msgr"] for a in ("lora", "lora-fresh")}
    worst = min(per_attack, key=per_attack.__getitem__)
    assert per_attack[worst] != max(per_attack.values())
    assert record["worst_case"]["mima"]["toy-judge"] == {"attack": worst, "msgr": per_attack[worst],
                                                         "per_attack": per_attack}
    assert record["before_attack"]["attack"] == "lora"  # the fresh-token runs do not draw the concept's prompt
    markdown = (out / "report" / "report.md").read_text()
    assert markdown.index("worst-case MSGR") < markdown.index("MRSGR")
    assert f"| mima | toy-judge | {per_attack[worst]:.1f} | {worst} |" in markdown


def test_a_variants_scales_multiply_the_methods_default_for_the_model_or_the_shared_setting():
    from mima.attacks import attacks
    from mima.attacks.variants import AttackVariant

    lora = attacks.get("lora")
    strong = AttackVariant.parse({"name": "lora-strong", "method": "lora", "lr_scale": 3, "steps_scale": 2})
    for toy, default_lr in ((True, lora.default_lr), (False, lora.reference_lr)):
        config = strong.config({}, seed=1, toy=toy)
        assert (config.lr, config.steps, config.seed) == (pytest.approx(3 * default_lr), 2 * lora.default_steps, 1)
        assert config.save_every is None  # a quarter of the scaled budget, when the run is built
    shared = strong.config({"lr": 0.01, "steps": 10, "rank": 2}, seed=0, toy=True)
    assert (shared.lr, shared.steps, shared.rank) == (pytest.approx(0.03), 20, 2)
    plain = AttackVariant.parse("lora").config({"steps": 10}, seed=0, toy=True)
    assert (plain.method, plain.lr, plain.steps) == ("lora", None, 10)


def test_a_failing_parallel_piece_raises_its_own_one_line_error(tmp_path):
    from mima.attacks import AttackConfig, AttackRun
    from mima.benchmark import AttackPiece
    from mima.data.concepts import load_concepts
    from mima.errors import ModelError
    from mima.executors import LocalExecutor

    concept = load_concepts(["toy:star"])[0]
    config = AttackConfig.from_dict({"method": "lora", "steps": 1, "n_images": 2})
    runs = [AttackRun(str(tmp_path / "no-model"), concept, config, tmp_path / f"run{i}") for i in range(2)]
    pieces = [AttackPiece(run) for run in runs]
    with pytest.raises(ModelError, match="no-model") as error:
        LocalExecutor(jobs=2).run(pieces)
    assert "\n" not in str(error.value)
    assert not any((tmp_path / f"run{i}" / "attack.json").exists() for i in range(2))


def test_presets_validate():
    from mima.benchmark import PRESETS, load_preset
    from mima.toy.world import HELD_OUT

    for name in PRESETS:
        for config in load_preset(name).values():
            assert config.model == "toy" and "mima" in config.methods and config.attack.get("eval_images", 32) >= 32
    full = load_preset("toy-full")
    assert {part: c.setting for part, c in full.items()} == {"relearn": "relearn", "personalize": "personalize"}
    assert all(len(c.attacks) == 4 and c.non_targets for c in full.values())
    assert all(t.removeprefix("toy:") in HELD_OUT for t in full["personalize"].targets)
    assert not any(t.removeprefix("toy:") in HELD_OUT for t in full["relearn"].targets)


SUITE = """
suite: [first, second]
first: &first
  targets: [toy:stripes]
  methods: [mima]
second:
  <<: *first
  setting: personalize
  targets: [toy:plaid]
"""


def test_a_suite_runs_each_part_into_its_own_folder(tmp_path, monkeypatch, capsys):
    from mima.benchmark import Benchmark

    ran = []

    def fake_run(self, plan):
        ran.append((self.out_dir.name, self.config.setting, [c.name for c in plan.targets], self.config.methods))
        return self.out_dir / "report"

    monkeypatch.setattr(Benchmark, "run", fake_run)
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE)
    assert main(["benchmark", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    assert ran == [("first", "relearn", ["stripes"], ("mima",)), ("second", "personalize", ["plaid"], ("mima",))]
    assert "second: report:" in capsys.readouterr().out


def test_a_bad_suite_is_one_clear_error(tmp_path, capsys):
    for text, message in (("suite: []\n", "non-empty list"), ("suite: [first]\n", "section 'first' not found"),
                          ("suite: [a]\na: {colour: red}\n", "colour")):
        path = tmp_path / "suite.yaml"
        path.write_text(text)
        assert main(["benchmark", "--config", str(path), "--out", str(tmp_path / "out")]) != 0
        assert message in capsys.readouterr().err


def test_before_attack_skips_attacks_that_rewrite_the_prompt():
    from mima.attacks import attacks
    from mima.evaluate.results import ConceptResult, EncoderResult, Evaluation
    from mima.evaluate.summary import Drawing, before_attack

    assert not attacks.get("lora").rewrites_prompts() and not attacks.get("dreambooth").rewrites_prompts()
    assert attacks.get("textual-inversion").rewrites_prompts() and attacks.get("custom-diffusion").rewrites_prompts()

    def evaluation(s_with: float, rate: float) -> Evaluation:
        waves = ConceptResult("lora", False, [0, 5], [0.8, 0.9], [s_with, 0.9], [0.0, 0.0], 0.0, [1.0, 1.0],
                              [rate, 1.0])
        return Evaluation({}, {}, ["waves"], {"toy-judge": EncoderResult({"waves": waves}, {})})

    evaluations = {"mima": {"textual-inversion": {0: evaluation(0.1, 0.0)},
                            "lora": {0: evaluation(0.6, 0.5), 1: evaluation(0.7, 0.75)}}}
    assert before_attack(evaluations, [], ["waves"]) is None
    before = before_attack(evaluations, ["lora"], ["waves"])
    assert before.attack == "lora"
    waves = before.models["mima"]["toy-judge"]["waves"]
    assert abs(waves.similarity - 0.65) < 1e-12 and abs(waves.success_rate - 0.625) < 1e-12
    assert before.models["none"]["toy-judge"]["waves"] == Drawing(similarity=0.8, success_rate=1.0)
    rings = {model: {"toy-judge": {"rings": Drawing(0.9, 1.0)}} for model in ("none", "mima")}
    assert before_attack(evaluations, ["lora"], ["waves"], rings).models["mima"]["toy-judge"] == {
        "waves": waves, "rings": Drawing(0.9, 1.0)}
    alone = before_attack(evaluations, [], ["waves"], rings)  # bystanders only: no attack keeps the prompts
    assert alone.attack is None and alone.models == rings


def test_a_non_target_drawn_under_most_of_the_reference_similarity_is_flagged_whatever_the_judge_says():
    from mima.evaluate.summary import DRAWN_SHARE, BeforeAttack, Drawing

    def drawings(waves: float, stripes: float) -> dict:
        return {"efficientnet-lite0": {"waves": Drawing(waves, None), "stripes": Drawing(stripes, None)},
                "toy-judge": {"waves": Drawing(0.99, 1.0), "stripes": Drawing(0.5, 0.0)}}

    reference = 0.82
    before = BeforeAttack("lora", {"none": drawings(reference, 0.4), "mima": drawings(0.29, 0.1),
                                   "imma": drawings(DRAWN_SHARE * reference + 0.01, 0.1)})
    assert before.damaged(["waves"]) == ["mima draws 1 concept(s) it should keep under 0.8 of none's similarity "
                                         "before any attack (efficientnet-lite0): waves (non-target) 0.29 against "
                                         "0.82"]
    assert before.damaged([]) == []  # targets drawn less are the point of the immunization
    assert before.damaged([], ["waves"]) == ["mima draws 1 concept(s) it should keep under 0.8 of none's similarity "
                                             "before any attack (efficientnet-lite0): waves 0.29 against 0.82"]


def test_summary_gives_the_spread_over_seeds_of_msgr_and_each_sgr():
    import statistics

    from mima.evaluate.metrics import MRSGR, MSGR, AttackSuccessRate
    from mima.evaluate.results import ConceptResult, EncoderResult, Evaluation
    from mima.evaluate.summary import summarize

    def evaluation(msgr: float, stripes: list[float], waves: list[float]) -> Evaluation:
        def concept(target: bool, sgr: list[float]) -> ConceptResult:
            return ConceptResult("lora", target, [0, 5, 10], [0.1, 0.5, 0.9], [0.1, 0.3, 0.5], sgr, 0.0)

        metrics = {MSGR.name: msgr, MRSGR.name: 0.0, AttackSuccessRate.name: 0.5}
        concepts = {"stripes": concept(True, stripes), "waves": concept(False, waves)}
        return Evaluation({}, {}, ["waves"], {"toy-judge": EncoderResult(concepts, metrics)})

    by_seed = {0: evaluation(20.0, [0.0, 0.1, 0.3], [0.0, 0.0, 0.02]),  # SGR over t >= 1: 20 %, waves 1 %
               100: evaluation(30.0, [9.0, 0.4, 0.6], [0.0, -0.04, -0.02]),  # 50 %, -3 %
               200: evaluation(40.0, [0.0, 0.2, 0.4], [0.0, 0.06, 0.04])}  # 30 %, 5 %
    one = summarize({"mima": {"lora": {0: by_seed[0]}}}, ["stripes"], ["waves"])["mima"]["lora"]["toy-judge"]
    assert one.msgr_sd is None and one.sgr_sd == {"stripes": None} and one.to_json()["msgr_sd"] is None
    row = summarize({"mima": {"lora": by_seed}}, ["stripes"], ["waves"])["mima"]["lora"]["toy-judge"]
    assert row.msgr == pytest.approx(30.0) and row.msgr_sd == pytest.approx(10.0)
    assert row.sgr["stripes"] == pytest.approx(100 / 3)
    assert row.sgr_sd["stripes"] == pytest.approx(statistics.stdev([20.0, 50.0, 30.0]))
    assert row.non_target_sgr["waves"] == pytest.approx(1.0)
    assert row.non_target_sgr_sd["waves"] == pytest.approx(4.0)
    from mima.evaluate.benchmark_report import _table

    summary = {"mima": {"lora": {"toy-judge": row, "efficientnet-lite0": one}}}
    assert [cells[3] for cells in _table(summary)[1:]] == ["30.0 ± 10.0", "20.0"]  # the report's MSGR column


def test_between_runs_is_the_non_target_sgr_of_the_un_immunized_model_against_itself():
    from mima.evaluate.benchmark_report import _table
    from mima.evaluate.metrics import MRSGR, MSGR, AttackSuccessRate
    from mima.evaluate.results import ConceptResult, EncoderResult, Evaluation
    from mima.evaluate.summary import summarize

    def evaluation(waves_without: list[float]) -> Evaluation:
        waves = ConceptResult("lora", False, [0, 5, 10], waves_without, [0.1, 0.5, 0.9], [0.0, 0.0, 0.0], 0.0)
        metrics = {MSGR.name: 0.0, MRSGR.name: 0.0, AttackSuccessRate.name: 0.5}
        return Evaluation({}, {}, ["waves"], {"toy-judge": EncoderResult({"waves": waves}, metrics)})

    def between(*runs: list[float]) -> float | None:
        by_seed = {100 * i: evaluation(run) for i, run in enumerate(runs)}
        return summarize({"mima": {"lora": by_seed}}, [], ["waves"])["mima"]["lora"]["toy-judge"].between_runs["waves"]

    # (0.5 - 0.4) / 0.5 = (1.0 - 0.8) / 1.0 = 20 % one way, (0.4 - 0.5) / 0.4 = (0.8 - 1.0) / 0.8 = -25 % the other
    assert between([0.1, 0.4, 0.8], [0.1, 0.5, 1.0]) == pytest.approx(22.5)
    assert between([0.3, 0.4, 0.8], [0.1, 0.4, 0.8]) == pytest.approx(0.0)  # step 0 is not counted
    assert between([0.1, 0.4, 0.8]) is None  # one run: no spread to measure
    row = summarize({"mima": {"lora": {0: evaluation([0.1, 0.4, 0.8]), 1: evaluation([0.1, 0.5, 1.0])}}}, [],
                    ["waves"])["mima"]["lora"]["toy-judge"]
    assert row.to_json()["between_runs"] == {"waves": pytest.approx(22.5)}
    assert _table({"mima": {"lora": {"toy-judge": row}}})[1][6] == "22.5"  # the report's column beside |SGR|


def _assert_bystanders_are_drawn_as_step_0_and_scored(out, config, before):
    """A bystander's samples are the images an attack run's step 0 would draw of it, and the report scores them."""
    from mima.attacks import AttackConfig
    from mima.benchmark.pieces import BystanderPiece
    from mima.data.concepts import toy_concept_spec
    from mima.evaluate.encoders import get_encoder
    from mima.evaluate.evaluate import drawings

    attack = out / "attacks/none/lora/star/seed0"
    recorded = AttackConfig.from_dict(json.loads((attack / "attack.json").read_text())["config"])
    piece = BystanderPiece("none", out / "models/none/model", toy_concept_spec("star"), recorded, out / "star-drawn")
    piece.run()
    drawn, step_0 = (read_image_folder(folder) for folder in (piece.out / "samples", attack / "samples/step_0"))
    assert drawn[1] == step_0[1] and len(drawn[0]) == config["attack"]["eval_images"]
    assert [np.asarray(i).tolist() for i in drawn[0]] == [np.asarray(i).tolist() for i in step_0[0]]
    folders = {model: [out / f"bystanders/{model}/rings/seed0/samples"] for model in ("none", "mima")}
    scored = drawings(folders, out / "report/references/rings", get_encoder("toy-judge"), "rings")
    for model, rings in scored.items():
        assert before["models"][model]["toy-judge"]["rings"] == {"similarity": rings.similarity,
                                                                 "success_rate": rings.success_rate}
        assert rings.success_rate is not None


def test_bystander_samples_drawn_with_other_settings_are_refused_not_reused(tmp_path):
    from mima.attacks import AttackConfig
    from mima.benchmark.pieces import BystanderPiece
    from mima.data.concepts import toy_concept_spec
    from mima.errors import ConfigError

    piece = BystanderPiece("mima", tmp_path / "model", toy_concept_spec("rings"), AttackConfig(eval_images=2),
                           tmp_path / "rings")
    assert not piece.finished()
    piece.out.mkdir()
    (piece.out / "drawing.json").write_text(json.dumps({**piece.settings(), "sampling_steps": 10}))
    with pytest.raises(ConfigError, match="sampling_steps: 10 -> 25"):
        piece.finished()
    (piece.out / "drawing.json").write_text(json.dumps(piece.settings()))
    assert piece.finished()


def test_a_target_with_its_own_class_images_takes_them_and_shares_nothing(tmp_path):
    """A target given as a mapping keeps its class images through the saved config; the others share a drawn folder."""
    from mima.benchmark import Benchmark, BenchmarkConfig

    free = tmp_path / "free"
    config = BenchmarkConfig.from_dict({"targets": [{"name": "toy:square", "class_images": str(free)}, "toy:stripes"],
                                        "methods": ["mima"], "immunize": {"steps": 1}})
    config.save_json(tmp_path / "benchmark_config.json")
    assert BenchmarkConfig.load_json(tmp_path / "benchmark_config.json") == config
    benchmark = Benchmark(config, tmp_path / "out")
    pieces = benchmark.immunization_pieces(benchmark.plan().targets)
    shared = tmp_path / "out" / "class-images" / "class-a-painting"
    for piece in pieces:
        assert {s.name: s.class_images for s in piece.runner.specs} == {"square": free, "stripes": shared}
    drawn = benchmark.base_images_piece(pieces)  # the shipped defaults' prior and retain terms read class images
    assert {s.name: s.class_images for s in drawn.specs} == {"square": free, "stripes": shared}
