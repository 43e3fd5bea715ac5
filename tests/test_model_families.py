"""The model-family interface (mima.models.family): SDXL's conditioning is what diffusers' pipeline computes, the
Merge holds on its 2,048-wide text features, an unsupported pipeline class is one clear error."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from mima.cli import main
from mima.data.captions import load_caption_bank
from mima.errors import ModelError
from mima.merge.plan import MergePlan
from mima.models.components import Components
from mima.models.cross_attention import key_value_parameter_names
from mima.models.family import model_family

PROMPTS = ["a painting in the style of Zorblax Quenn", "Zorblax Quenn"]


def test_sdxl_conditioning_is_what_its_diffusers_pipeline_feeds_the_unet(sdxl_model_dir):
    components = Components.from_pretrained(sdxl_model_dir)
    with torch.no_grad():
        packed = components.encode_prompts(PROMPTS)  # (B, T + 1, 2048)
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_model_dir)
        hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), hidden.dtype, pooled.shape[-1])
    assert packed.shape == (2, 78, 2048)
    torch.testing.assert_close(packed[:, :-1], hidden)
    torch.testing.assert_close(packed[:, -1, : pooled.shape[1]], pooled)
    torch.testing.assert_close(packed[:, -1, pooled.shape[1] : pooled.shape[1] + 6], time_ids.expand(2, 6))
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        ours = components.unet(noisy, t, encoder_hidden_states=packed).sample
        theirs = pipe.unet(noisy, t, encoder_hidden_states=hidden,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(2, 6)}).sample
    torch.testing.assert_close(ours, theirs)



@pytest.mark.parametrize("model", ["sd15_model_dir", "sdxl_model_dir"])
def test_the_unconditional_conditioning_is_what_the_sampling_pipeline_guides_from(model, request):
    """SD: the empty prompt's features; SDXL: zeros for them and the pooled embedding
    (`force_zeros_for_empty_prompt`), the size ids kept."""
    components = Components.from_pretrained(request.getfixturevalue(model))
    pipe = components.to_pipeline()
    with torch.no_grad():
        ours = components.family.unconditional(components)
        encoded = pipe.encode_prompt(PROMPTS[:1], device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=True)
    torch.testing.assert_close(ours[:, : encoded[1].shape[1]], encoded[1])
    if model == "sdxl_model_dir":
        pooled = encoded[3]
        assert not pooled.any() and ours.shape == (1, 78, 2048)
        torch.testing.assert_close(ours[:, -1, : pooled.shape[1]], pooled)
        size_ids = components.encode_prompts([""])[:, -1, pooled.shape[1] :]
        torch.testing.assert_close(ours[:, -1, pooled.shape[1] :], size_ids)

def test_the_merge_satisfies_its_constraints_on_sdxl_2048_wide_features(sdxl_model_dir):
    """W_hat C^T = V: the merged key/value maps the concept's 2,048-wide token features as the adapted copy does."""
    components = Components.from_pretrained(sdxl_model_dir)
    plan = MergePlan.build(components, [PROMPTS], load_caption_bank("generic")[:24])
    targets = plan.targets.double()  # (m, 2048)
    assert targets.shape[1] == 2048 and targets.shape[0] > 1
    name = key_value_parameter_names(components.unet)[0]
    w0 = components.unet.get_parameter(name).detach().double()  # (d_out, 2048)
    w1 = w0 + 0.1 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(0), dtype=w0.dtype)
    merged = plan.merge_key_value(w0, [plan.concept_targets[0].double() @ w1.T])  # V_1 = C_1 W_1^T
    # to the solve's jitter precision: random text encoders give nearly collinear token features
    torch.testing.assert_close(merged @ targets.T, w1 @ targets.T, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, w1)  # only on C: elsewhere it stays near W_0
    unchanged = plan.merge_key_value(w0, [plan.concept_targets[0].double() @ w0.T])
    torch.testing.assert_close(unchanged, w0, rtol=1e-8, atol=1e-8)


def test_an_unsupported_pipeline_class_is_one_error_naming_the_supported_ones(sd15_model_dir, tmp_path, capsys):
    model = shutil.copytree(sd15_model_dir, tmp_path / "flux")
    index = model / "model_index.json"
    index.write_text(index.read_text().replace("StableDiffusionPipeline", "FluxPipeline"))
    assert main(["generate", "--model", str(model), "--prompt", "a cat", "--out", str(tmp_path / "a.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mima: error:") and "FluxPipeline" in error
    assert "StableDiffusionPipeline" in error and "StableDiffusionXLPipeline" in error


@pytest.mark.parametrize("index", ["{}", "[1, 2]", '{"_class_name": ["a"]}', "not json"])
def test_a_model_index_without_a_pipeline_class_is_a_model_error(tmp_path, index):
    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(ModelError, match="model_index.json"):
        model_family(tmp_path)
