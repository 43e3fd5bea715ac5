"""Shared fixtures. The whole suite runs offline: nothing here or in a test may reach the network.

The session fixtures are built once and shared by every test, so tests must not mutate them: a test that trains
or edits weights takes `copy.deepcopy(tiny_components)` (or copies `tiny_model_dir`) first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest

# Set before any test module imports huggingface_hub, which reads them once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share the cores: one torch thread each (read at torch's import)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory: pytest.TempPathFactory):
    """The tiny, seeded, randomly initialised toy components (UNet channels (4, 8), cross-attention width 8)."""
    from mima.toy.model import build_toy_components

    return build_toy_components(tmp_path_factory.mktemp("tiny") / "tok", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_components` saved as a diffusers pipeline folder (read-only by convention)."""
    return tiny_components.save_pretrained(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def benchmark_script():
    """A loader of the scripts under benchmarks/ (not a package) as modules: `benchmark_script("efficacy_study")`."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (small convolutions are faster, and timings less noisy, that way)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interrupted_at(monkeypatch):
    """`with interrupted_at(LoopClass, k):` the loop's training stops with KeyboardInterrupt (as at Ctrl-C) just
    before step k + 1 would run; leaving the block restores the step."""

    @contextlib.contextmanager
    def interrupt(loop_class: type, step: int):
        original = loop_class.train_step

        def train_step(loop):
            if loop.step == step:
                raise KeyboardInterrupt
            return original(loop)

        with monkeypatch.context() as patch:
            patch.setattr(loop_class, "train_step", train_step)
            yield

    return interrupt


@pytest.fixture(scope="session")
def sd15_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random pipeline shaped like SD 1.5 (tests/sd_shaped.py), saved once per session (read-only by convention)."""
    from sd_shaped import build_sd15_shaped

    return build_sd15_shaped(tmp_path_factory.mktemp("sd15") / "model")


@pytest.fixture(scope="session")
def sd2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random pipeline shaped like SD 2.x (v-prediction, 1024-wide text), saved once per session."""
    from sd_shaped import build_sd2_shaped

    return build_sd2_shaped(tmp_path_factory.mktemp("sd2") / "model")


@pytest.fixture(scope="session")
def sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random pipeline shaped like SDXL (two text encoders, 2,048-wide text features, added conditions)."""
    from sd_shaped import build_sdxl_shaped

    return build_sdxl_shaped(tmp_path_factory.mktemp("sdxl") / "model")
