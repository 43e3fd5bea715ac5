"""Selection of UNet parameters by name pattern (S^l, S^u): globs include, a '!' glob leaves names out."""

from __future__ import annotations

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
