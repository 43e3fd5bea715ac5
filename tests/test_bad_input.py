"""Bad input, class by class (issue 17): every case exits 2 with one `mima: error:` line, no traceback, before any
model loads where it can, and leaves every file that existed before it exactly as it was.

Each case builds its fixtures in the test's own folder and returns the command line; `FAILS` lists, per case, the
words its one error line must hold.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from mima.cli import main

IMMUNIZE = ["--steps", "2", "--save-every", "1", "--n-images", "2", "--n-class-images", "2", "--batch-size", "2",
            "--caption-bank", "toy"]
ATTACK = ["--method", "lora", "--steps", "2", "--save-every", "1", "--n-images", "2", "--eval-images", "1",
          "--sampling-steps", "1", "--batch-size", "2"]
NOT_UTF8 = "caf\u00e9: 1\n".encode("latin-1")


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """An immunization and a LoRA attack on the tiny model, each killed right after its first checkpoint."""
    import mima.utils.checkpoint as checkpoint

    runs = {"immunize": ["immunize", "--concepts", "toy:stripes", *IMMUNIZE],
            "attack": ["attack", "--concept", "toy:donut", *ATTACK]}
    folders = {}
    original = checkpoint.atomic_directory

    def killed_after(directory):
        with original(directory) as tmp:
            yield tmp
        raise KeyboardInterrupt  # as a kill -9 right after the checkpoint landed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "atomic_directory", contextlib.contextmanager(killed_after))
        for name, argv in runs.items():
            folders[name] = tmp_path_factory.mktemp("interrupted") / name
            assert main([*argv, "--model", str(tiny_model_dir), "--out", str(folders[name])]) == 130
            assert checkpoint.has_checkpoint(folders[name] / "checkpoint")
    return folders


def _copy(source: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(source, tmp / "out"))


def _finished(tmp: Path, record: str, part: str) -> Path:
    """A folder holding a finished run: its record and one part, as far as the folder rule can tell."""
    out = tmp / "out"
    (out / part).mkdir(parents=True)
    (out / part / "weights.safetensors").write_bytes(b"a finished model")
    (out / record).write_text(json.dumps({"config": {}, "model": "toy"}))
    return out


def _user_files(tmp: Path) -> Path:
    out = tmp / "out"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"someone's photo")
    return out


def _file(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _unloadable_model(tmp: Path) -> Path:
    """A folder that looks like a pipeline but fails to load: an error about it means the model loaded first."""
    (tmp / "model").mkdir()
    return _file(tmp, "model/model_index.json", "{}").parent


def _concept_with_corrupt_image(tmp: Path) -> Path:
    (tmp / "images").mkdir()
    _file(tmp, "images/broken.png", b"not a png")
    return _file(tmp, "c.yaml", f"concepts: [{{name: zorblax, prompt: a zorblax, images: {tmp / 'images'}}}]\n")


def _benchmark(tmp: Path, **fields) -> list[str]:
    out = tmp / "bench"
    out.mkdir()
    (out / "benchmark_config.json").write_text('{"an": "earlier benchmark"}\n')
    config = {"targets": ["toy:stripes"], "non_targets": [], "methods": ["mima"], "encoders": ["toy-judge"], **fields}
    return ["benchmark", "--config", str(_file(tmp, "bench.yaml", yaml.safe_dump(config))), "--out", str(out)]


def _references(tmp: Path, *concepts: str) -> Path:
    for concept in concepts:
        (tmp / "references" / concept).mkdir(parents=True)
    return tmp / "references"


def _read_only(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`--out` on a read-only file system (simulated: the tests run as any user, root included)."""
    out, original = tmp / "ro" / "out", os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).is_relative_to(tmp / "ro"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    return out


def _full_disk(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The disk fills while the model is saved: safetensors writes half a file, then reports the OS error."""
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return tmp / "out"


def _no_weights(model: Path, tmp: Path, monkeypatch) -> Path:
    """The model, whose weights must not load: a check that needs only its tokenizer comes first."""
    from mima.models.components import Components

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(Components, "from_pretrained", refuse)
    return model


def _immunize(model, out, *extra):
    return ["immunize", "--model", str(model), "--concepts", "toy:stripes", "--out", str(out), *IMMUNIZE, *extra]


def _attack(model, out, *extra):
    return ["attack", "--model", str(model), "--concept", "toy:donut", "--out", str(out), *ATTACK, *extra]


# name -> (command line from (tmp, tiny model, interrupted runs, monkeypatch), words of the error line)
FAILS = {
    # 1. --resume trusts any checkpoint
    "resume-other-seed": (lambda t, m, i, p: _immunize(m, _copy(i["immunize"], t), "--resume", "--seed", "1"),
                          "seed: 0 -> 1"),
    "resume-other-concepts": (
        lambda t, m, i, p: [*_immunize(m, _copy(i["immunize"], t), "--resume"), "--concepts", "toy:dots"],
        "concepts: ['stripes'] -> ['dots']"),
    "resume-other-method": (lambda t, m, i, p: _immunize(m, _copy(i["immunize"], t), "--resume", "--method", "imma"),
                            "method: 'mima' -> 'imma'"),
    "resume-lora-as-ti": (
        lambda t, m, i, p: _attack(m, _copy(i["attack"], t), "--resume", "--method", "textual-inversion"),
        "method: 'lora' -> 'textual-inversion'"),
    "resume-empty-folder": (lambda t, m, i, p: _immunize(m, (t / "empty").mkdir() or t / "empty", "--resume"),
                            "no checkpoint"),
    "resume-and-overwrite": (lambda t, m, i, p: _immunize(m, _copy(i["immunize"], t), "--resume", "--overwrite"),
                             "only one of them"),
    # 2. a finished --out is silently overwritten
    "immunize-over-finished": (lambda t, m, i, p: _immunize(m, _finished(t, "immunization.json", "model")),
                               "finished `mima immunize` run"),
    "attack-over-finished": (lambda t, m, i, p: _attack(m, _finished(t, "attack.json", "export")),
                             "finished `mima attack` run"),
    "immunize-into-user-files": (lambda t, m, i, p: _immunize(m, _user_files(t)), "holiday.jpg"),
    "toy-images-into-user-files": (
        lambda t, m, i, p: ["toy", "images", "star", "--n", "2", "--out", str(_user_files(t))], "holiday.jpg"),
    "generate-over-a-file": (
        lambda t, m, i, p: ["generate", "--model", str(_unloadable_model(t)), "--prompt", "a star", "--out",
                            str(_file(t, "star.png", b"an earlier grid"))], "pass --overwrite"),
    "toy-judge-over-a-file": (
        lambda t, m, i, p: ["toy", "judge", "--model", str(_unloadable_model(t)), "--out",
                            str(_file(t, "rates.json", "{}"))], "pass --overwrite"),
    "toy-images-over-finished": (
        lambda t, m, i, p: ["toy", "images", "star", "--n", "2", "--out",
                            str(_finished(t, "metadata.csv", "00000.png"))], "--overwrite"),
    # 3. validation that is not complete, or comes late
    "nan-outer-lr": (lambda t, m, i, p: _immunize(m, t / "out", "--outer-lr", "nan"), "finite"),
    "inf-inner-lr": (lambda t, m, i, p: _immunize(m, t / "out", "--inner-lr", "inf"), "finite"),
    "nan-attack-lr": (lambda t, m, i, p: _attack(m, t / "out", "--lr", "nan"), "finite"),
    "nan-lr-in-yaml": (
        lambda t, m, i, p: _immunize(m, t / "out", "--config", str(_file(t, "s.yaml", "outer_lr: .nan"))), "finite"),
    "validate-nan": (lambda t, m, i, p: ["validate", str(_file(t, "s.yaml", "inner_lr: .inf\n"))], "finite"),
    "validate-misspelt-attack": (
        lambda t, m, i, p: ["validate", "--kind", "attack", str(_file(t, "a.yaml", "method: lroa\n"))],
        "did you mean 'lora'"),
    "misspelt-simulated-attacker": (
        lambda t, m, i, p: _immunize(m, t / "out", "--config", str(_file(t, "s.yaml", "attackers: [{kind: ful}]"))),
        "did you mean 'full'"),
    "simulated-attacker-negative-lr": (
        lambda t, m, i, p: _immunize(m, t / "out", "--config",
                                     str(_file(t, "s.yaml", "attackers: [{kind: full, lr: -1}]"))), "positive"),
    "missing-caption-bank": (lambda t, m, i, p: _immunize(m, t / "out", "--caption-bank", str(t / "nope.txt")),
                             "nope.txt"),
    "misspelt-attacker-kind-on-the-cli": (lambda t, m, i, p: _immunize(m, t / "out", "--attackers", "full", "ful"),
                                         "unknown simulated attacker 'ful'"),
    "adam-attacker-in-second-order": (
        lambda t, m, i, p: _immunize(m, t / "out", "--config",
                                     str(_file(t, "s.yaml", "attackers: [{kind: full, optimizer: adam}]\n"))),
        "Adam inner steps are first order only"),
    "retained-target": (lambda t, m, i, p: _immunize(m, t / "out", "--retain-concepts", "toy:stripes"),
                        "retain_concepts must not name a target: stripes"),
    "retained-without-retain-term": (
        lambda t, m, i, p: _immunize(m, t / "out", "--retain-concepts", "toy:rings", "--retain-weight", "0"),
        "give retain_weight > 0"),
    "unconditional-share-above-one": (
        lambda t, m, i, p: _immunize(m, t / "out", "--bank-prior-unconditional", "1.5"),
        "bank_prior_unconditional is a share in [0, 1], got 1.5"),
    "unconditional-without-bank-prior": (
        lambda t, m, i, p: _immunize(m, t / "out", "--bank-prior-unconditional", "0.25", "--bank-prior-weight", "0"),
        "give bank_prior_weight > 0"),
    "retained-unknown-concept": (lambda t, m, i, p: _immunize(m, t / "out", "--retain-concepts", "toy:ringz"),
                                 "ringz"),
    "benchmark-misspelt-attack": (lambda t, m, i, p: _benchmark(t, attacks=["lora", "dreambooht"]),
                                  "did you mean 'dreambooth'"),
    "benchmark-misspelt-encoder": (lambda t, m, i, p: _benchmark(t, attacks=["lora"], encoders=["toy-judeg"]),
                                   "did you mean 'toy-judge'"),
    "benchmark-variant-without-name": (lambda t, m, i, p: _benchmark(t, attacks=["lora", {"method": "lora"}]),
                                       "needs a name"),
    "benchmark-variant-twice": (
        lambda t, m, i, p: _benchmark(t, attacks=["lora", {"name": "lora", "method": "lora", "lr_scale": 3}]),
        "given twice"),
    "benchmark-variant-misspelt-key": (
        lambda t, m, i, p: _benchmark(t, attacks=[{"name": "strong", "method": "lora", "stesp": 3}]),
        "did you mean 'steps'"),
    "benchmark-variant-zero-scale": (
        lambda t, m, i, p: _benchmark(t, attacks=[{"name": "weak", "method": "lora", "lr_scale": 0}]),
        "lr_scale must be a positive number"),
    "benchmark-variant-common-fresh-token": (
        lambda t, m, i, p: _benchmark(t, model=str(_no_weights(m, t, p)), attacks=[
            "lora", {"name": "fresh", "method": "lora", "prompt": "fresh-token", "token": "star"}]), "common word"),
    "benchmark-nan": (lambda t, m, i, p: _benchmark(t, immunize={"outer_lr": float("nan")}), "finite"),
    "benchmark-bystander-also-a-target": (lambda t, m, i, p: _benchmark(t, bystanders=["toy:stripes"]),
                                          "duplicate concept name"),
    "benchmark-misspelt-bystander": (lambda t, m, i, p: _benchmark(t, bystanders=["toy:ringz"]), "did you mean"),
    "benchmark-bystander-without-references": (
        lambda t, m, i, p: _benchmark(t, bystanders=["toy:rings"], references=str(_references(t, "stripes"))),
        "has no folder for rings"),
    "sweep-misspelt-method": (
        lambda t, m, i, p: ["attack-sweep", "--model", str(m), "--concept", "toy:donut", "--methods", "lora", "lroa",
                            "--budgets", "1", "--out", str(t / "sweep")], "did you mean 'lora'"),
    "attack-empty-prompt": (lambda t, m, i, p: _attack(m, t / "out", "--prompt", " "), "non-empty text"),
    "attack-common-fresh-token": (
        lambda t, m, i, p: _attack(_no_weights(m, t, p), t / "out", "--prompt", "fresh-token", "--token", "star"),
        "common word"),
    "attack-fresh-token-names-concept": (
        lambda t, m, i, p: _attack(_no_weights(m, t, p), t / "out", "--prompt", "fresh-token", "--token", "donut"),
        "word of concept 'donut'"),
    "attack-learned-token-exists": (
        lambda t, m, i, p: _attack(_no_weights(m, t, p), t / "out", "--method", "custom-diffusion", "--prompt",
                                   "fresh-token", "--token", "star"), "already exists"),
    "attack-token-with-space": (lambda t, m, i, p: _attack(m, t / "out", "--token", "s k"), "one word"),
    "sweep-empty-prompt": (
        lambda t, m, i, p: ["attack-sweep", "--model", str(m), "--concept", "toy:donut", "--methods", "lora",
                            "--prompts", "concept", "", "--budgets", "1", "--out", str(t / "sweep")], "non-empty"),
    "sweep-common-fresh-token": (
        lambda t, m, i, p: ["attack-sweep", "--model", str(_no_weights(m, t, p)), "--concept", "toy:donut",
                            "--methods", "lora", "--prompts", "concept", "fresh-token", "--token", "star",
                            "--budgets", "1", "--out", str(t / "sweep")], "common word"),
    # 4. tracebacks instead of errors
    "settings-not-utf8": (lambda t, m, i, p: _immunize(m, t / "out", "--config", str(_file(t, "s.yaml", NOT_UTF8))),
                          "not UTF-8"),
    "concepts-not-utf8": (
        lambda t, m, i, p: [*_immunize(m, t / "out"), "--concepts", str(_file(t, "c.yaml", NOT_UTF8))], "not UTF-8"),
    "caption-bank-not-utf8": (
        lambda t, m, i, p: _immunize(m, t / "out", "--caption-bank", str(_file(t, "bank.txt", NOT_UTF8))),
        "not UTF-8"),
    "benchmark-not-utf8": (lambda t, m, i, p: ["benchmark", "--config", str(_file(t, "b.yaml", NOT_UTF8)), "--out",
                                               str(t / "bench")], "not UTF-8"),
    "validate-not-utf8": (lambda t, m, i, p: ["validate", str(_file(t, "s.yaml", NOT_UTF8))], "not UTF-8"),
    "concept-number-for-text": (
        lambda t, m, i, p: [*_immunize(m, t / "out"), "--concepts",
                            str(_file(t, "c.yaml", "concepts: [{name: a, prompt: p, images: 5}]\n"))],
        "concept key 'images' must be a text"),
    "corrupt-image-before-the-model-loads": (
        lambda t, m, i, p: ["immunize", "--model", str(_unloadable_model(t)), "--out", str(t / "out"), *IMMUNIZE,
                            "--concepts", str(_concept_with_corrupt_image(t))], "broken.png"),
    "read-only-out": (lambda t, m, i, p: _immunize(m, _read_only(t, p)), "Read-only file system"),
    "full-disk": (lambda t, m, i, p: _immunize(m, _full_disk(t, p), "--method", "none", "--setting", "personalize",
                                               "--prior-weight", "0", "--retain-weight", "0"),
                  "No space left on device"),
}
WRITES_BEFORE_FAILING = {"full-disk", "corrupt-image-before-the-model-loads"}  # concept images, run settings


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", FAILS)
def test_bad_input_is_one_error_line_and_changes_nothing(case, tmp_path, tiny_model_dir, interrupted, monkeypatch,
                                                         capsys):
    build, words = FAILS[case]
    argv = build(tmp_path, tiny_model_dir, interrupted, monkeypatch)
    before = _files(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mima:")]  # a run may first say where it runs
    assert code == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith("mima: error:") and words in errors[0], err
    after = _files(tmp_path)
    assert {name: after.get(name) for name in before} == before, "a file that existed before was changed"
    if case in WRITES_BEFORE_FAILING:
        assert not [name for name in after if ".tmp" in name], "a temporary file or folder was left behind"
    else:
        assert after == before, f"new files: {sorted(set(after) - set(before))}"
