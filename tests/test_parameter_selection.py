"""Selection of UNet parameters by name pattern (S^l, S^u): globs include, a '!' glob leaves names out, GLOB=SCALE sets
rates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mima.errors import ConfigError
from mima.immunize.config import ImmunizeConfig
from mima.models.components import Components, toy_model_dir
from mima.models.cross_attention import key_value_parameter_names, select_parameters

BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"
NAMES = [f"{BLOCK}.attn1.to_k.weight", f"{BLOCK}.attn2.to_q.weight", f"{BLOCK}.attn2.to_k.weight",
         f"{BLOCK}.attn2.to_v.weight", f"{BLOCK}.ff.net.2.weight", "down_blocks.1.attentions.0.proj_in.weight"]


def test_a_bang_pattern_leaves_out_what_it_matches_whatever_the_order():
    patterns = ["!*attn2.to_k.*", "*transformer_blocks*", "!*attn2.to_v.*"]
    assert select_parameters(NAMES, patterns, what="upper") == [
        f"{BLOCK}.attn1.to_k.weight", f"{BLOCK}.attn2.to_q.weight", f"{BLOCK}.ff.net.2.weight"]
    assert select_parameters(NAMES, ["*to_k.*"], what="upper") == [f"{BLOCK}.attn1.to_k.weight",
                                                                    f"{BLOCK}.attn2.to_k.weight"]


def test_a_selection_left_empty_by_exclusions_is_a_config_error():
    with pytest.raises(ConfigError, match="match no UNet parameter"):
        select_parameters(NAMES, ["*attn2.to_k.*", "!*attn2.*"], what="upper-level (S^u)")


def test_the_shipped_config_without_keys_and_values_selects_every_other_transformer_block_weight():
    unet = Components.from_pretrained(toy_model_dir()).unet
    names = [name for name, _ in unet.named_parameters()]
    config = ImmunizeConfig.from_yaml(Path(__file__).parents[1] / "configs" / "upper-without-keys-values.yaml")
    selected = select_parameters(names, config.upper_params, what="upper-level (S^u)")
    blocks = select_parameters(names, ["*transformer_blocks*"], what="upper-level (S^u)")
    assert set(selected) < set(blocks) and set(blocks) - set(selected) == set(key_value_parameter_names(unet))


def test_the_half_rate_config_halves_exactly_the_keys_and_values_rate():
    unet = Components.from_pretrained(toy_model_dir()).unet
    names = [name for name, _ in unet.named_parameters()]
    config = ImmunizeConfig.from_yaml(Path(__file__).parents[1] / "configs" / "keys-values-half-rate.yaml")
    scales = config.upper_rate_scales(select_parameters(names, config.upper_params, what="upper-level (S^u)"))
    assert {name for name, scale in scales.items() if scale == 0.5} == set(key_value_parameter_names(unet))
    assert set(scales.values()) == {0.5, 1.0}


def test_the_fresh_token_config_skips_exactly_the_keys_and_values_on_the_fresh_token_steps():
    from mima.immunize.attacker_spec import DEFAULT_ATTACKERS
    from mima.immunize.trainer import _skipped_per_attacker

    unet = Components.from_pretrained(toy_model_dir()).unet
    names = [name for name, _ in unet.named_parameters()]
    config = ImmunizeConfig.from_yaml(Path(__file__).parents[1] / "configs" / "keys-values-off-fresh-token-steps.yaml")
    upper = select_parameters(names, config.upper_params, what="upper-level (S^u)")
    assert _skipped_per_attacker(config, names, upper) == [frozenset(), frozenset(key_value_parameter_names(unet))]
    specs, defaults = config.attacker_specs(), ImmunizeConfig(attackers=DEFAULT_ATTACKERS).attacker_specs()
    assert [dataclasses.replace(spec, upper_skip=()) for spec in specs] == defaults  # otherwise the shipped ones


def test_the_last_matching_rate_scale_wins_and_bad_entries_are_config_errors():
    config = ImmunizeConfig(upper_lr_scales=("*attn2.*=3", "*attn2.to_k.*=0.25"))
    assert config.upper_rate_scales(NAMES) == {NAMES[0]: 1.0, NAMES[1]: 3.0, NAMES[2]: 0.25, NAMES[3]: 3.0,
                                               NAMES[4]: 1.0, NAMES[5]: 1.0}
    for entry in ("*attn2.*", "*attn2.*=-1", "=2", "*attn2.*=inf", "*attn2.*=x"):
        with pytest.raises(ConfigError, match="GLOB=SCALE"):
            ImmunizeConfig(upper_lr_scales=(entry,))
    with pytest.raises(ConfigError, match="matches no upper-level"):
        config.with_overrides(upper_lr_scales=("*to_kk*=2",)).upper_rate_scales(NAMES)


def test_an_attackers_upper_skip_names_unet_weights_and_skips_those_in_s_u():
    """Skipping the keys and values where S^u leaves them out skips nothing; a glob naming no UNet weight, or a skip
    holding all of S^u, is a ConfigError."""
    from mima.immunize.trainer import _skipped_per_attacker

    skip_keys_values = {"kind": "lora", "upper_skip": ["*attn2.to_k.*", "*attn2.to_v.*"]}
    config = ImmunizeConfig(attackers=({"kind": "lora"}, skip_keys_values))
    assert _skipped_per_attacker(config, NAMES, NAMES[:5]) == [frozenset(), frozenset(NAMES[2:4])]
    without = select_parameters(NAMES, ["*transformer_blocks*", "!*attn2.to_k.*", "!*attn2.to_v.*"], what="S^u")
    assert _skipped_per_attacker(config, NAMES, without) == [frozenset(), frozenset()]
    with pytest.raises(ConfigError, match="match no UNet parameter"):
        _skipped_per_attacker(config.with_overrides(attackers=({"kind": "lora", "upper_skip": ["*to_kk*"]},)),
                              NAMES, NAMES)
    with pytest.raises(ConfigError, match="holds every S\\^u weight"):
        _skipped_per_attacker(config, NAMES, NAMES[2:4])
