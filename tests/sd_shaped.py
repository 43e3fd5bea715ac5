"""Small, randomly initialised pipelines shaped like real Stable Diffusion checkpoints, built offline in seconds.

`build_sd15_shaped(out_dir)` has SD 1.5's structure at a fraction of its widths: four down blocks with
cross-attention in the first three (mirrored up blocks), 768-wide text features from a CLIP text encoder with 77
positions, 8x VAE downsampling (4 blocks; 64 px -> 8 x 8 latents), a PNDM scheduler, a safety checker and a
feature extractor. Its CLIP BPE tokenizer knows the words of mima's generic caption bank as single tokens, so a
concept word such as "Zorblax" splits into several tokens, as rare words do in CLIP's own vocabulary.
`build_sd2_shaped(out_dir)` is SD 2.x's variant: v-prediction, 1024-wide text, linear projections in the
transformer blocks and a DDIM scheduler, no safety checker. `build_sdxl_shaped(out_dir)` is SDXL's.

Benchmarks import it too: `sys.path.insert(0, "tests"); from sd_shaped import build_sd15_shaped`.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from mima.toy.model import build_bpe_tokenizer

CLIP_MAX_TOKENS = 77
RESOLUTION = 64
_SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, steps_offset=1, clip_sample=False,
)


def caption_bank_words() -> list[str]:
    """The words of mima's generic caption bank and of prompt templates: the SD-shaped tokenizer's whole words."""
    text = (resources.files("mima") / "assets" / "captions" / "generic.txt").read_text(encoding="utf-8")
    return sorted(set(re.findall(r"[a-z]+", text.lower())) | {"style", "painting", "art", "portrait"})


def _text_encoder(vocab_size: int, width: int, tokenizer, projection: bool = False) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=width // 64, max_position_embeddings=CLIP_MAX_TOKENS, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _unet(cross_attention_dim: int, resolution: int = RESOLUTION, **overrides) -> UNet2DConditionModel:
    sizes = dict(layers_per_block=1, block_out_channels=(8, 8, 16, 16), norm_num_groups=4, attention_head_dim=2)
    return UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **{**sizes, **overrides},
    )


def _vae(resolution: int = RESOLUTION) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=resolution,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
    )


def _safety_checker() -> StableDiffusionSafetyChecker:
    tiny = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    text = dict(vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1, **tiny)
    config = CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=8)
    return StableDiffusionSafetyChecker(config)


def build_sd15_shaped(out_dir: str | Path, seed: int = 0, resolution: int = RESOLUTION) -> Path:
    """Write an SD-1.5-shaped random pipeline (diffusers format, safetensors) at `resolution` px to `out_dir`;
    return the folder."""
    out_dir = Path(out_dir)
    tokenizer = build_bpe_tokenizer(caption_bank_words(), out_dir / "tokenizer", CLIP_MAX_TOKENS)
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        tokenizer=tokenizer, text_encoder=_text_encoder(len(tokenizer), 768, tokenizer), vae=_vae(resolution),
        unet=_unet(768, resolution), scheduler=PNDMScheduler.from_config({**_SD_SCHEDULE, "skip_prk_steps": True}),
        safety_checker=_safety_checker(), feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
        requires_safety_checker=True,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


SD15_CHANNELS = (320, 640, 1280, 1280)
SD15_HALF_CHANNELS = tuple(c // 2 for c in SD15_CHANNELS)


def build_sd15_wide(
    out_dir: str | Path, seed: int = 0, channels: tuple[int, ...] = SD15_CHANNELS, resolution: int = RESOLUTION
) -> Path:
    """The SD-1.5-shaped pipeline with SD 1.5's UNet layout (two layers per block, 8 heads) at `channels` wide;
    at SD 1.5's own channels, 860M parameters. Half of them (160 to 640) give a quarter of the parameters, 220M, so
    that on the fixture's small latents parameter-sized tensors dominate a step's memory
    (benchmarks/immunize_step.py --model sd15-half-width); at 512 px, a real model's UNet cost on a GPU
    (scripts/device_run.py)."""
    out_dir = build_sd15_shaped(out_dir, seed, resolution)
    torch.manual_seed(seed)
    unet = _unet(768, resolution, block_out_channels=channels, layers_per_block=2, norm_num_groups=32,
                 attention_head_dim=8)
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    return out_dir


def build_sd2_shaped(out_dir: str | Path, seed: int = 0) -> Path:
    """Write an SD-2.x-shaped random pipeline (v-prediction, 1024-wide text) to `out_dir`; return the folder."""
    out_dir = Path(out_dir)
    tokenizer = build_bpe_tokenizer(caption_bank_words(), out_dir / "tokenizer", CLIP_MAX_TOKENS)
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        tokenizer=tokenizer, text_encoder=_text_encoder(len(tokenizer), 1024, tokenizer), vae=_vae(),
        unet=_unet(1024, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True),
        scheduler=DDIMScheduler(**_SD_SCHEDULE, prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_sdxl_shaped(out_dir: str | Path, seed: int = 0) -> Path:
    """Write an SDXL-shaped random pipeline to `out_dir`: two text encoders (768 and 1280 wide, concatenated to 2048),
    the second's pooled projection and size / crop ids as added conditions, 3 UNet levels, an Euler scheduler."""
    out_dir = Path(out_dir)
    tokenizer = build_bpe_tokenizer(caption_bank_words(), out_dir / "tokenizer", CLIP_MAX_TOKENS)
    tokenizer_2 = build_bpe_tokenizer(caption_bank_words(), out_dir / "tokenizer_2", CLIP_MAX_TOKENS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16), norm_num_groups=4, cross_attention_dim=768 + 1280,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=1280 + 6 * 8,
    )
    pipe = StableDiffusionXLPipeline(
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, text_encoder=_text_encoder(len(tokenizer), 768, tokenizer),
        text_encoder_2=_text_encoder(len(tokenizer_2), 1280, tokenizer_2, projection=True), vae=_vae(), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config({**_SD_SCHEDULE, "timestep_spacing": "leading"}),
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
