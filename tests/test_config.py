"""`mima.config.Config` through the configs mima ships: ImmunizeConfig, AttackConfig and BenchmarkConfig."""

from __future__ import annotations

import json
import warnings
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from mima.attacks.config import AttackConfig
from mima.benchmark import BenchmarkConfig
from mima.cli import main
from mima.errors import ConfigError
from mima.immunize.config import ImmunizeConfig

CONFIGS = Path(__file__).parents[1] / "configs"


def make_config() -> ImmunizeConfig:
    return ImmunizeConfig(method="imma", steps=10, upper_params=("*to_q*", "*to_k*"), order="first-order",
                          inner_lr=0.5, seed=3)


def test_dict_round_trip_with_tuples_and_dicts():
    config = make_config()
    data = config.to_dict()
    assert data["upper_params"] == ["*to_q*", "*to_k*"]
    json.dumps(data)
    restored = ImmunizeConfig.from_dict(data)
    assert restored == config and isinstance(restored.upper_params, tuple)
    bench = BenchmarkConfig(seeds=(0, 1), immunize={"steps": 3}, attack={"steps": 20})
    assert BenchmarkConfig.from_dict(json.loads(json.dumps(bench.to_dict()))) == bench


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
        ImmunizeConfig.from_dict({"stpes": 5})
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' in AttackConfig; valid keys: method, steps"):
        AttackConfig.from_dict({"zzz": 1})


def test_non_strict_warns_and_drops_unknown_keys():
    with pytest.warns(UserWarning, match="ignoring unknown key 'added_in_v9' in AttackConfig"):
        config = AttackConfig.from_dict({"steps": 5, "added_in_v9": 1}, strict=False)
    assert config == AttackConfig(steps=5)


def test_bad_values():
    with pytest.raises(ConfigError, match="invalid value 'ten' for 'steps' in ImmunizeConfig; expected int"):
        ImmunizeConfig.from_dict({"steps": "ten"})
    with pytest.raises(ConfigError, match="invalid value True for 'steps'"):
        ImmunizeConfig.from_dict({"steps": True})
    with pytest.raises(ConfigError, match="expected one of 'second-order', 'first-order'"):
        ImmunizeConfig.from_dict({"order": "third-order"})
    with pytest.raises(ConfigError, match="invalid value 'x' for 'lr' in AttackConfig"):
        AttackConfig.from_dict({"lr": "x"})  # float | None
    with pytest.raises(ConfigError, match="invalid value 'lora' for 'attacks' in BenchmarkConfig"):
        BenchmarkConfig.from_dict({"attacks": "lora"})  # a tuple needs a list
    assert AttackConfig.from_dict({"lr": "1e-4", "steps": None}) == AttackConfig(lr=1e-4)  # YAML's 1e-4 is a string


def test_post_init_validation():
    with pytest.raises(ConfigError, match=r"steps must be >= 0 \(0: by the number of targets\), got -1"):
        ImmunizeConfig(steps=-1)
    with pytest.raises(ConfigError, match="setting must be 'relearn' or 'personalize'"):
        BenchmarkConfig.from_dict({"setting": "other"})


def test_from_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("immunize:\n  steps: 10\n  upper_params: ['*to_q*']\n  outer_lr: 1e-3\nattack:\n  rank: 4\n")
    config = ImmunizeConfig.from_yaml(path, section="immunize")
    assert config.upper_params == ("*to_q*",) and config.outer_lr == 1e-3
    assert AttackConfig.from_yaml(path, section="attack").rank == 4
    with pytest.raises(ConfigError, match="section 'merge' not found"):
        ImmunizeConfig.from_yaml(path, section="merge")
    with pytest.raises(ConfigError, match="unknown key 'immunize' in ImmunizeConfig"):
        ImmunizeConfig.from_yaml(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert ImmunizeConfig.from_yaml(empty) == ImmunizeConfig()


def test_from_yaml_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        ImmunizeConfig.from_yaml(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [unclosed\nseed: 3\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        ImmunizeConfig.from_yaml(broken)
    assert "\n" not in str(info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        ImmunizeConfig.from_yaml(listing)


def test_overrides_precedence(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("method: imma\nsteps: 50\nretain_weight: 0.5\nprior_weight: 2.0\n")
    from_yaml = ImmunizeConfig.from_yaml(path)
    assert (from_yaml.steps, from_yaml.order) == (50, "second-order")  # order: default

    cli = {"method": None, "steps": 20, "retain_weight": 0, "prior_weight": 0.0, "upper_params": ["*attn1*"]}
    config = from_yaml.with_overrides(**cli)
    assert config.method == "imma"  # None: not given, YAML wins
    assert config.steps == 20  # CLI wins
    assert config.retain_weight == 0.0 and config.prior_weight == 0.0  # falsy values are given
    assert config.upper_params == ("*attn1*",)
    assert from_yaml.steps == 50  # original untouched


def test_overrides_are_validated():
    config = ImmunizeConfig(steps=10)
    with pytest.raises(ConfigError, match="inner_steps must be positive"):
        config.with_overrides(inner_steps=0)
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        config.with_overrides(step=3)


def test_strict_from_dict_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImmunizeConfig.from_dict({"steps": 3})


def test_differences_against_a_record():
    config = make_config()
    recorded = json.loads(json.dumps(config.to_dict()))
    assert config.differences(recorded) == {}
    recorded["steps"] = 20
    del recorded["ridge"]  # written before the field existed: counts as its default
    recorded["retired"] = 1  # a field this version does not know
    assert config.differences(recorded) == {"steps": (20, 10)}
    assert config.differences(recorded, fields=["seed", "order"]) == {}
    assert config.differences({**recorded, "seed": 4}, ["seed"]) == {"seed": (4, 3)}
    del recorded["inner_clip"]  # a record from before `inner_clip`: made with its "absent" value, not today's default
    assert config.differences(recorded, ["inner_clip"]) == {"inner_clip": (0.0, 1.0)}
    del recorded["retired"]
    with pytest.warns(UserWarning, match="retired"):
        ImmunizeConfig.from_record({**recorded, "retired": 1})
    assert ImmunizeConfig.from_record(recorded).inner_clip == 0.0
    assert ImmunizeConfig.from_dict(recorded).inner_clip == 1.0
    del recorded["bank_prior_target"]  # from before the distillation: the bank prior was a denoising loss
    assert ImmunizeConfig.from_record(recorded).bank_prior_target == "noise"
    del recorded["bank_prior_weight"]  # from before the bank prior: off, whatever today's default
    assert ImmunizeConfig.from_record(recorded).bank_prior_weight == 0 < ImmunizeConfig().resolved("bank_prior_weight")


def test_the_setting_decides_the_defaults_of_what_is_left_unset(tmp_path):
    """With held-out targets (personalize) the retain term's own Textual Inversion, weighted 6, and the bank prior
    weighted 10 under the empty prompt; relearn keeps 3 and 5 without them. Given values stay, whichever the setting
    (a YAML's under a `--setting` flag too), and a term turned off gets nothing of it."""
    def as_run_takes(config):
        resolved = config.for_setting()
        return (resolved.retain_weight, resolved.bank_prior_weight, resolved.bank_prior_unconditional,
                [spec.kind for spec in resolved.retain_attacker_specs()])

    assert as_run_takes(ImmunizeConfig()) == (3.0, 5.0, 0.0, [])
    assert as_run_takes(ImmunizeConfig(setting="personalize")) == (6.0, 10.0, 1.0, ["textual-inversion"])
    path = tmp_path / "config.yaml"
    path.write_text("retain_weight: 4.0\n")
    flagged = ImmunizeConfig.from_yaml(path).with_overrides(setting="personalize")
    assert as_run_takes(flagged) == (4.0, 10.0, 1.0, ["textual-inversion"])
    off = ImmunizeConfig(setting="personalize", retain_weight=0.0, bank_prior_weight=0.0)
    assert as_run_takes(off) == (0.0, 0.0, 0.0, []) and not off.uses_bank_prior
    assert ImmunizeConfig(setting="personalize").for_setting().for_setting() == ImmunizeConfig(
        setting="personalize").for_setting()  # resolving twice changes nothing
    with pytest.raises(ConfigError, match="retain_attackers attack for the retain term"):
        ImmunizeConfig(setting="personalize", retain_weight=0.0, retain_attackers=("lora",))


def test_validate_prints_the_settings_as_the_run_takes_them(tmp_path, capsys):
    path = tmp_path / "held-out.yaml"
    path.write_text("setting: personalize\nbank_prior_weight: 7.0\n")
    assert main(["validate", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "  retain_weight: 6.0\n" in printed and "  bank_prior_weight: 7.0\n" in printed
    assert "  bank_prior_unconditional: 1.0\n" in printed and "textual-inversion" in printed


def test_simulated_attackers_differ_only_in_what_ran():
    """An attacker's unset learning rate and prompt are its kind's defaults, in the config and in a record that
    left them out (or predates the field); a setting that really differs still shows."""
    config = ImmunizeConfig(attackers=({"kind": "lora"},))
    assert config.differences({"attackers": [{"kind": "lora", "lr": 3.0}]}, ["attackers"]) == {}
    assert config.differences({"attackers": ["lora"]}, ["attackers"]) == {}
    changed = config.differences({"attackers": [{"kind": "lora", "lr": 1.0}]}, ["attackers"])
    assert list(changed) == ["attackers"] and changed["attackers"][0][0]["lr"] == 1.0
    retaining = ImmunizeConfig(retain_attackers=("textual-inversion",))  # the retain term's own, alike
    recorded = {"retain_attackers": [{"kind": "textual-inversion", "lr": 3.0, "prompt": "fresh-token"}]}
    assert retaining.differences(recorded, ["retain_attackers"]) == {}
    assert list(retaining.differences({"retain_attackers": []}, ["retain_attackers"])) == ["retain_attackers"]
    assert list(config.differences({"retain_attackers": ["lora"]}, ["retain_attackers"])) == ["retain_attackers"]


@pytest.mark.parametrize("name", ["immunize-toy", "attackers-full", "attackers-lora", "attackers-lora-wide",
                                  "attackers-mixed", "upper-without-keys-values",
                                  "keys-values-half-rate", "keys-values-off-fresh-token-steps", "without-bank-prior",
                                  "retain-long-textual-inversion", "personalize-textual-inversion-start",
                                  "many-targets-keep-new-words"])
def test_shipped_immunize_configs_load_and_name_what_exists(name):
    """Each immunize YAML in configs/ is one a run accepts, before any model loads, for the demo's targets."""
    from mima.data.concepts import toy_concept_spec

    config = ImmunizeConfig.from_yaml(CONFIGS / f"{name}.yaml")
    config.check_names()
    config.check_concepts([toy_concept_spec(c) for c in ("stripes", "checker", "dots")])


def test_the_many_targets_config_is_the_personalize_terms_in_the_relearn_setting():
    """configs/many-targets-keep-new-words.yaml says it holds the personalize defaults' terms: it must not drift."""
    from mima.immunize.setting import SETTING_DEFAULTS

    config = ImmunizeConfig.from_yaml(CONFIGS / "many-targets-keep-new-words.yaml")
    assert config.setting == "relearn"
    personalize = ImmunizeConfig(setting="personalize").for_setting()
    relearn = ImmunizeConfig().for_setting()
    for name in SETTING_DEFAULTS["personalize"]:
        assert getattr(config.for_setting(), name) == getattr(personalize, name) != getattr(relearn, name), name
