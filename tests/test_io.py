import os

import pytest
import torch

from mima.utils.io import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    hash_file,
    hash_tensors,
    load_tensor_metadata,
    load_tensors,
    load_torch_state,
    save_tensors,
    save_torch_state,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "file.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["file.txt"]


def test_atomic_directory_success_replaces_existing(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # still the old one while writing
    assert sorted(os.listdir(final)) == ["new.txt"]
    assert os.listdir(tmp_path) == ["ckpt"]


def test_atomic_directory_creates_missing(tmp_path):
    final = tmp_path / "nested" / "ckpt"
    with atomic_directory(final) as tmp:
        (tmp / "x").write_text("x")
    assert (final / "x").read_text() == "x"


def test_atomic_directory_exception_keeps_old(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            (tmp / "partial.txt").write_text("partial")
            raise RuntimeError("boom")
    assert sorted(os.listdir(final)) == ["old.txt"]
    assert (final / "old.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_safetensors_round_trip_with_metadata(tmp_path):
    tensors = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # non-contiguous
        "b": torch.ones(2, dtype=torch.bfloat16),
    }
    path = tmp_path / "weights.safetensors"
    save_tensors(path, tensors, metadata={"format": "pt", "base": "sd-1.5"})
    loaded = load_tensors(path)
    assert set(loaded) == {"w", "b"}
    assert torch.equal(loaded["w"], tensors["w"]) and loaded["b"].dtype == torch.bfloat16
    assert load_tensor_metadata(path) == {"format": "pt", "base": "sd-1.5"}
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_hash_tensors_stable_and_sensitive():
    a = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "y": torch.zeros(3, dtype=torch.bfloat16)}
    b = {"y": a["y"].clone(), "x": a["x"].clone()}
    digest = hash_tensors(a)
    assert digest == hash_tensors(b)  # order independent
    assert len(digest) == 64
    changed = {"x": a["x"].clone(), "y": a["y"].clone()}
    changed["x"][1, 2] = 5.5
    assert hash_tensors(changed) != digest
    assert hash_tensors({"x": a["x"].reshape(3, 2), "y": a["y"]}) != digest  # shape matters
    assert hash_tensors({"x": a["x"].double(), "y": a["y"]}) != digest  # dtype matters
    assert hash_tensors({"z": a["x"], "y": a["y"]}) != digest  # names matter


def test_hash_tensors_known_value():
    # Pins the byte layout so hashes recorded in artifacts stay valid across versions.
    digest = hash_tensors({"x": torch.tensor([1, 2], dtype=torch.int32)})
    assert digest == "16f358d93b51de0139f320a6d5ef7c2bc73d7a2052a527b145a61b935453df54"
    assert hash_tensors({}) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_hash_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert hash_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_torch_state_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "optimizer.pt"
    save_torch_state(optimizer.state_dict(), path)
    state = load_torch_state(path)
    assert torch.equal(state["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    restored = torch.optim.AdamW(model.parameters(), lr=0.5)
    restored.load_state_dict(state)
    assert restored.param_groups[0]["lr"] == 0.1


def test_load_torch_state_rejects_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Unsafe()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_torch_state(path)


class Unsafe:
    pass


def test_a_checkpoint_of_other_tensors_is_a_model_error(tmp_path):
    from mima.errors import ModelError
    from mima.utils.checkpoint import load_checkpoint, save_checkpoint

    lora = {"0": torch.nn.Parameter(torch.ones(2, 3))}
    save_checkpoint(tmp_path / "checkpoint", lora, torch.optim.AdamW(lora.values()), 1, [])
    embedding = {"0": torch.nn.Parameter(torch.zeros(5))}  # what textual inversion trains instead
    with pytest.raises(ModelError, match="does not fit this run"):
        load_checkpoint(tmp_path / "checkpoint", embedding, torch.optim.AdamW(embedding.values()))
    assert torch.equal(embedding["0"], torch.zeros(5))
