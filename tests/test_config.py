from __future__ import annotations

import json
import warnings
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mima.config import REQUIRED, Config
from mima.errors import ConfigError


@dataclass(frozen=True)
class OptimizerConfig(Config):
    lr: float = field(default=1e-4, metadata={"help": "Learning rate."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas."})


@dataclass(frozen=True)
class ImmunizeConfig(Config):
    model: str = field(metadata={"help": "Model id or path."})
    steps: int = field(default=100, metadata={"help": "Optimisation steps."})
    warmup: int = field(default=0, metadata={"help": "Warm-up steps."})
    targets: tuple[str, ...] = field(default=("attn1", "attn2"), metadata={"help": "Module name patterns."})
    output_dir: Path = field(default=Path("runs/immunize"), metadata={"help": "Output directory."})
    dtype: Literal["fp32", "fp16", "bf16"] = field(default="fp32", metadata={"help": "Compute dtype."})
    use_ema: bool = field(default=True, metadata={"help": "Keep an EMA of weights."})
    clip: float = field(default=1.0, metadata={"help": "Gradient clip.", "absent": 0.0})
    seed: int | None = field(default=None, metadata={"help": "Random seed."})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"help": "Optimizer."})

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")
        if self.warmup > self.steps:
            raise ConfigError(f"warmup ({self.warmup}) must not exceed steps ({self.steps})")


def make_config() -> ImmunizeConfig:
    return ImmunizeConfig(
        model="sd-1.5",
        steps=10,
        targets=("to_q", "to_k"),
        output_dir=Path("out"),
        dtype="bf16",
        seed=3,
        optimizer=OptimizerConfig(lr=0.5, betas=(0.8, 0.9)),
    )


def test_dict_round_trip_with_nested_config_and_tuples():
    config = make_config()
    data = config.to_dict()
    assert data["targets"] == ["to_q", "to_k"]
    assert data["output_dir"] == "out"
    assert data["optimizer"] == {"lr": 0.5, "betas": [0.8, 0.9]}
    json.dumps(data)
    restored = ImmunizeConfig.from_dict(data)
    assert restored == config
    assert isinstance(restored.targets, tuple) and isinstance(restored.optimizer.betas, tuple)
    assert isinstance(restored.output_dir, Path)
    assert hash(restored) == hash(config)


def test_json_round_trip(tmp_path):
    config = make_config()
    path = tmp_path / "sub" / "config.json"
    config.save_json(path)
    text = path.read_text()
    assert text.endswith("}\n")
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert ImmunizeConfig.load_json(path) == config


def test_configs_are_frozen():
    with pytest.raises(FrozenInstanceError):
        make_config().steps = 5


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"^unknown key 'stpes' in ImmunizeConfig; did you mean 'steps'\?$"):
        ImmunizeConfig.from_dict({"model": "m", "stpes": 5})
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate' in OptimizerConfig"):
        ImmunizeConfig.from_dict({"model": "m", "optimizer": {"learning_rate": 1.0}})


def test_non_strict_warns_and_drops_unknown_keys():
    data = {"model": "m", "steps": 5, "added_in_v9": 1, "optimizer": {"lr": 0.1, "nested_new": True}}
    with pytest.warns(UserWarning) as record:
        config = ImmunizeConfig.from_dict(data, strict=False)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert messages[0].startswith("ignoring unknown key 'added_in_v9' in ImmunizeConfig")
    assert messages[1].startswith("ignoring unknown key 'nested_new' in OptimizerConfig")
    assert config == ImmunizeConfig(model="m", steps=5, optimizer=OptimizerConfig(lr=0.1))


def test_missing_required_and_bad_values():
    with pytest.raises(ConfigError, match="missing required key 'model' in ImmunizeConfig"):
        ImmunizeConfig.from_dict({})
    with pytest.raises(ConfigError, match="invalid value 'ten' for 'steps' in ImmunizeConfig; expected int"):
        ImmunizeConfig.from_dict({"model": "m", "steps": "ten"})
    with pytest.raises(ConfigError, match="invalid value True for 'steps'"):
        ImmunizeConfig.from_dict({"model": "m", "steps": True})
    with pytest.raises(ConfigError, match="expected one of 'fp32', 'fp16', 'bf16'"):
        ImmunizeConfig.from_dict({"model": "m", "dtype": "fp8"})


def test_post_init_validation():
    with pytest.raises(ConfigError, match="steps must be positive, got 0"):
        ImmunizeConfig(model="m", steps=0)
    with pytest.raises(ConfigError, match=r"warmup \(20\) must not exceed steps \(10\)"):
        ImmunizeConfig.from_dict({"model": "m", "steps": 10, "warmup": 20})


def test_from_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "immunize:\n"
        "  model: sd-1.5\n"
        "  steps: 10\n"
        "  targets: [to_q, to_k]\n"
        "  optimizer:\n"
        "    lr: 1e-3\n"
        "    betas: [0.8, 0.9]\n"
        "attack:\n"
        "  rank: 4\n"
    )
    config = ImmunizeConfig.from_yaml(path, section="immunize")
    assert config.targets == ("to_q", "to_k")
    assert config.optimizer == OptimizerConfig(lr=1e-3, betas=(0.8, 0.9))
    with pytest.raises(ConfigError, match="section 'merge' not found"):
        ImmunizeConfig.from_yaml(path, section="merge")
    with pytest.raises(ConfigError, match="unknown key 'immunize' in ImmunizeConfig"):
        ImmunizeConfig.from_yaml(path)


def test_from_yaml_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        ImmunizeConfig.from_yaml(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\nsteps: 3\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        ImmunizeConfig.from_yaml(broken)
    assert "\n" not in str(info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        ImmunizeConfig.from_yaml(listing)


def test_overrides_precedence(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: from-yaml\nsteps: 50\nwarmup: 5\nuse_ema: true\n")
    from_yaml = ImmunizeConfig.from_yaml(path)
    assert (from_yaml.steps, from_yaml.warmup, from_yaml.dtype) == (50, 5, "fp32")  # dtype: default

    cli = {"model": None, "steps": 20, "warmup": 0, "use_ema": False, "seed": None, "targets": ["q"]}
    config = from_yaml.with_overrides(**cli)
    assert config.model == "from-yaml"  # None: not given, YAML wins
    assert config.steps == 20  # CLI wins
    assert config.warmup == 0 and config.use_ema is False  # falsy values are given
    assert config.targets == ("q",)
    assert config.seed is None
    assert from_yaml.steps == 50  # original untouched


def test_overrides_are_validated():
    config = ImmunizeConfig(model="m", steps=10)
    with pytest.raises(ConfigError, match="steps must be positive"):
        config.with_overrides(steps=0)
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        config.with_overrides(step=3)


def test_help_table():
    rows = {name: (help_, default) for name, help_, default in ImmunizeConfig.help_table()}
    assert rows["model"] == ("Model id or path.", REQUIRED)
    assert rows["steps"] == ("Optimisation steps.", 100)
    assert rows["optimizer"] == ("Optimizer.", OptimizerConfig())
    assert [row[0] for row in ImmunizeConfig.help_table()][:3] == ["model", "steps", "warmup"]


def test_strict_from_dict_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImmunizeConfig.from_dict({"model": "m"})


def test_differences_against_a_record():
    config = make_config()
    recorded = json.loads(json.dumps(config.to_dict()))
    assert config.differences(recorded) == {}
    recorded["steps"] = 20
    del recorded["use_ema"]  # written before the field existed: counts as its default (True)
    recorded["retired"] = 1  # a field this version does not know
    assert config.differences(recorded) == {"steps": (20, 10)}
    assert config.differences(recorded, fields=["seed", "dtype"]) == {}
    assert make_config().differences({**recorded, "use_ema": False}, ["use_ema"]) == {"use_ema": (False, True)}
    assert "model" in config.differences({k: v for k, v in recorded.items() if k != "model"})  # required: no default
    del recorded["clip"]  # a record from before `clip`: made with its "absent" value, not today's default
    assert config.differences(recorded, ["clip"]) == {"clip": (0.0, 1.0)}
    del recorded["retired"]
    assert ImmunizeConfig.from_record(recorded).clip == 0.0 and ImmunizeConfig.from_dict(recorded).clip == 1.0
