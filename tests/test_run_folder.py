"""The output-folder rule (mima.utils.run_folder): what a run starts from, replaces, resumes or leaves alone."""

import json

import pytest

from mima.cli import main
from mima.errors import ConfigError
from mima.utils.checkpoint import read_settings
from mima.utils.run_folder import ATTACK, claim_run_folder, finished_run


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _attack_folder(root, *, finished=True, checkpoint=False):
    for path in ("export/weights.safetensors", "samples/step_0/00000.png", "samples/step_8/00000.png",
                 "data/donut/00000.png"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"old")
    if finished:
        (root / "attack.json").write_text(json.dumps({"config": {"seed": 0}, "model": "m", "concept": "donut"}))
    if checkpoint:
        (root / "checkpoint").mkdir()
        (root / "checkpoint" / "progress.json").write_text('{"step": 1, "log": []}')
        (root / "checkpoint" / "settings.json").write_text(json.dumps({"config": {"seed": 0}}))
    return root


def test_overwrite_removes_the_old_run_completely_and_records_the_new_settings(tmp_path):
    out = _attack_folder(tmp_path / "run")
    claim_run_folder(out, ATTACK, {"config": {"seed": 1}}, overwrite=True)
    assert _tree(out) == ["checkpoint", "checkpoint/settings.json"]
    assert read_settings(out / "checkpoint") == {"config": {"seed": 1}}


def test_a_fresh_run_clears_the_leftovers_of_one_killed_before_its_first_checkpoint(tmp_path):
    out = _attack_folder(tmp_path / "run", finished=False)
    claim_run_folder(out, ATTACK, {"config": {}})
    assert _tree(out) == ["checkpoint", "checkpoint/settings.json"]  # no stale cached images or samples


def test_resume_keeps_the_run_and_drops_half_written_temporaries(tmp_path):
    out = _attack_folder(tmp_path / "run", finished=False, checkpoint=True)
    (out / ".checkpoint.tmp-123").mkdir()
    (out / ".attack.json.abc.tmp").write_text("half")
    (out / ".checkpoint.trash-7").mkdir()  # may hold the last whole checkpoint: kept
    before = _tree(out)
    seen = []
    claim_run_folder(out, ATTACK, resume=True, differences=lambda recorded: seen.append(recorded) or {})
    assert seen == [{"config": {"seed": 0}}]
    assert _tree(out) == [p for p in before if ".tmp" not in p]


def test_finished_run_compares_the_record_and_names_the_fields(tmp_path):
    out = _attack_folder(tmp_path / "run")
    assert finished_run(out, ATTACK, lambda record: {})
    assert not finished_run(tmp_path / "elsewhere", ATTACK, lambda record: {})
    with pytest.raises(ConfigError, match=r"other settings \(seed: 0 -> 1\)"):
        finished_run(out, ATTACK, lambda record: {"seed": (record["config"]["seed"], 1)})


def test_toy_images_overwrite_leaves_no_stale_image(tmp_path, capsys):
    out = tmp_path / "images"
    assert main(["toy", "images", "star", "--n", "3", "--out", str(out)]) == 0
    assert main(["toy", "images", "star", "--n", "2", "--out", str(out), "--overwrite"]) == 0, capsys.readouterr().err
    assert _tree(out) == ["00000.png", "00001.png", "metadata.csv"]
