"""The embedded toy model: a tiny Stable Diffusion for the toy world, and the tiny test fixture.

`toy_architecture(vocab_size, size)` gives the configs of every component; `build_toy_components` instantiates them
(seeded, randomly initialised); `build_toy_tokenizer` makes a CLIP BPE tokenizer from the toy world's
vocabulary. The pretrained weights ship inside the package (`TOY_MODEL_DIR`), made by `mima toy pretrain`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mima.models.components import Components
from mima.toy import world as toy_world

ToySize = Literal["tiny", "small"]
MAX_PROMPT_TOKENS = 16
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Words outside the toy world, so that generic captions and users' prompts tokenize into whole words.
_EXTRA_WORDS = (
    "a an the of in on with and or by for to at is this that one two three some many small large big little "
    "red green blue yellow orange purple pink black white gray brown dark light bright colorful "
    "photo picture image painting artwork drawing sketch art style shape object thing pattern texture "
    "background scene close up view simple plain centered high quality detailed new old famous artist "
    "dog cat car house tree person face man woman flower sky sea mountain city"
)


def toy_vocabulary() -> list[str]:
    """Every word of the toy world's prompts plus a small general vocabulary."""
    words = set(_EXTRA_WORDS.split())
    for concept in toy_world.toy_concepts():
        for prompt in (*concept.prompts, concept.class_prompt):
            words.update(prompt.split())
    return sorted(words)


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(symbols):
        if tuple(symbols[i:i + 2]) == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def train_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, until every word is one symbol.

    Ties are broken by the pair itself, so the merges (hence every token id) are the same on every run; the
    `tokenizers` trainer breaks them in hash order, which changes from process to process.
    """
    segmented = [[*word[:-1], word[-1] + "</w>"] for word in words]
    merges = []
    while counts := Counter(pair for symbols in segmented for pair in zip(symbols, symbols[1:], strict=False)):
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        segmented = [_merge_pair(symbols, best) for symbols in segmented]
    return merges


def build_toy_tokenizer(out_dir: Path) -> CLIPTokenizer:
    """A CLIP-format BPE (vocab.json + merges.txt) whose merges make every toy word a single token."""
    return build_bpe_tokenizer(toy_vocabulary(), out_dir, MAX_PROMPT_TOKENS)


def build_bpe_tokenizer(words: list[str], out_dir: Path, model_max_length: int) -> CLIPTokenizer:
    """A CLIP-format BPE whose merges make each of `words` one token; other words split into byte-level pieces."""
    merges = train_bpe_merges(words)
    # CLIP's vocabulary starts with the 256 byte symbols, alone and word-final, so any text is encodable.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    vocab_list += [left + right for left, right in merges]
    vocab_list += list(_SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: CLIPTokenizer, out_dir: Path) -> None:
    """`save_pretrained`, plus the classic CLIP BPE files (vocab.json, merges.txt) beside tokenizer.json."""
    tokenizer.save_pretrained(out_dir)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (out_dir / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    merge_lines = ["#version: 0.2"] + [" ".join(pair) for pair in bpe["merges"]]
    (out_dir / "merges.txt").write_text("\n".join(merge_lines) + "\n")


def toy_architecture(vocab_size: int, size: ToySize = "small") -> dict[str, dict]:
    """Configs of the toy components. `small` is the shipped model; `tiny` is the test fixture."""
    width, channels, groups = {"small": (64, (32, 64), 8), "tiny": (8, (4, 8), 2)}[size]
    text = dict(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4 if size == "small" else 2, max_position_embeddings=MAX_PROMPT_TOKENS,
        projection_dim=width, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=toy_world.RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32) if size == "small" else channels, layers_per_block=1, norm_num_groups=groups,
    )
    unet = dict(
        sample_size=toy_world.RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels, norm_num_groups=groups, cross_attention_dim=width,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4 if size == "small" else 2,
    )
    scheduler = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return {"text_encoder": text, "vae": vae, "unet": unet, "scheduler": scheduler}


def build_toy_components(tokenizer_dir: Path, size: ToySize = "small", seed: int = 0) -> Components:
    """Randomly initialised toy components (seeded), with a freshly built toy tokenizer in `tokenizer_dir`."""
    tokenizer = build_toy_tokenizer(tokenizer_dir)
    arch = toy_architecture(len(tokenizer), size)
    arch["text_encoder"].update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    return Components(
        tokenizer=tokenizer,
        text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
        vae=AutoencoderKL(**arch["vae"]),
        unet=UNet2DConditionModel(**arch["unet"]),
        scheduler=DDIMScheduler(**arch["scheduler"]),
    )
