"""The recipe that trains the embedded toy model from scratch: `mima toy pretrain`.

Stage 1 trains the VAE on toy-world images; stage 2 trains the UNet and text encoder jointly with the
shared diffusion loss (10 % empty prompts for classifier-free guidance, EMA weights); stage 3 continues with a
fresh cosine cycle on batches that are mostly objects, the concepts a small UNet learns last. Batches are drawn
from a generator seeded by (seed, stage, step), so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from mima.config import Config
from mima.errors import ConfigError, TrainingError
from mima.losses import diffusion_loss, unet_caller
from mima.models.components import Components
from mima.toy.model import build_toy_components, save_tokenizer
from mima.toy.world import sample_training_batch
from mima.utils.io import atomic_directory, load_torch_state, save_torch_state


@dataclass(frozen=True)
class ToyPretrainConfig(Config):
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data, noise and timesteps"})
    vae_steps: int = field(default=1500, metadata={"help": "VAE training steps (stage 1)"})
    vae_batch_size: int = field(default=32, metadata={"help": "VAE batch size"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE learning rate"})
    steps: int = field(default=8000, metadata={"help": "UNet + text encoder training steps (stage 2)"})
    batch_size: int = field(default=16, metadata={"help": "UNet batch size"})
    lr: float = field(default=1e-3, metadata={"help": "UNet + text encoder peak learning rate (cosine decay)"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warm-up steps of stage 2"})
    prompt_dropout: float = field(default=0.1, metadata={"help": "share of empty prompts (for guidance)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the UNet and text encoder"})
    focus_steps: int = field(default=6000, metadata={"help": "object-focus steps (stage 3; 0 skips it)"})
    focus_lr: float = field(default=5e-4, metadata={"help": "peak learning rate of stage 3 (cosine decay)"})
    focus_style_share: float = field(default=0.1, metadata={"help": "share of style-only images in stage 3"})
    save_every: int = field(default=500, metadata={"help": "checkpoint period in steps"})
    size: str = field(default="small", metadata={"help": "architecture: 'small' (shipped) or 'tiny' (tests)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.vae_steps, self.steps, self.batch_size, self.vae_batch_size, self.save_every) <= 0:
            raise ConfigError("steps, batch sizes and save_every must be positive")
        if self.focus_steps < 0 or not 0 <= self.focus_style_share <= 0.8:
            raise ConfigError("focus_steps must be >= 0 and focus_style_share in [0, 0.8]")
        if min(self.vae_lr, self.lr, self.focus_lr) <= 0 or self.warmup_steps < 0:
            raise ConfigError("vae_lr, lr and focus_lr must be positive and warmup_steps non-negative")
        if not (0 <= self.prompt_dropout < 1 and 0 <= self.ema_decay < 1):
            raise ConfigError("prompt_dropout and ema_decay must be in [0, 1)")


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _batch_rng(cfg: ToyPretrainConfig, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    seeds = np.random.SeedSequence([cfg.seed, stage, step])
    return np.random.default_rng(seeds), torch.Generator().manual_seed(int(seeds.generate_state(1)[0]))


def _vae_loss(comps: Components, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    posterior = comps.vae.encode(pixels).latent_dist
    reconstruction = comps.vae.decode(posterior.sample(generator)).sample
    return torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()


def _unet_loss(comps: Components, cfg: ToyPretrainConfig, stage: int, step: int) -> torch.Tensor:
    rng, generator = _batch_rng(cfg, stage, step)
    style_share = cfg.focus_style_share if stage == 3 else 0.4
    images, prompts, _ = sample_training_batch(cfg.batch_size, rng, style_share=style_share)
    prompts = ["" if rng.random() < cfg.prompt_dropout else p for p in prompts]
    with torch.no_grad():
        latents = comps.encode_images(images_to_tensor(images), generator)
    hidden = comps.encode_prompts(prompts)
    return diffusion_loss(unet_caller(comps.unet), comps.scheduler, latents, hidden, generator=generator)


class ToyPretrainer:
    """Three-stage pretraining with atomic checkpoints (`out_dir/checkpoint`) and resume."""

    def __init__(self, cfg: ToyPretrainConfig, out_dir: Path, device: torch.device | str = "cpu") -> None:
        self.cfg, self.out_dir, self.device = cfg, Path(out_dir), torch.device(device)
        # Built (and so initialised) on the CPU, then moved: the same seed gives the same model on any device.
        self.comps = build_toy_components(self.out_dir / "tokenizer-build", cfg.size, cfg.seed).to(self.device)
        self.unet_params = [*self.comps.unet.parameters(), *self.comps.text_encoder.parameters()]
        self.vae_opt = torch.optim.AdamW(self.comps.vae.parameters(), lr=cfg.vae_lr)
        self.opt = torch.optim.AdamW(self.unet_params, lr=cfg.lr, weight_decay=1e-2)
        self.lr_schedule = get_scheduler(
            "cosine", self.opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
        )
        self.ema = EMAModel(self.unet_params, decay=cfg.ema_decay)
        self.step, self.log = 0, []

    @property
    def total_steps(self) -> int:
        return self.cfg.vae_steps + self.cfg.steps + self.cfg.focus_steps

    @property
    def focus_start(self) -> int:
        return self.cfg.vae_steps + self.cfg.steps

    def _stage(self) -> str:
        return "vae" if self.step < self.cfg.vae_steps else "unet" if self.step < self.focus_start else "focus"

    def train(self) -> Components:
        self._maybe_resume()
        started = time.time()
        with tqdm(total=self.total_steps, initial=self.step, desc="pretrain toy") as bar:
            while self.step < self.total_steps:
                stage = self._stage()
                loss = self._train_step()
                self.step += 1
                self.log.append({"step": self.step, "loss": loss})
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{loss:.4f}")
                if self.step % self.cfg.save_every == 0 or self.step in (self.cfg.vae_steps, self.focus_start,
                                                                         self.total_steps):
                    self._save_checkpoint()
        self.log.append({"elapsed_s": time.time() - started})
        return self.final_components()

    def _train_step(self) -> float:
        if self.step < self.cfg.vae_steps:
            rng, generator = _batch_rng(self.cfg, 1, self.step)
            pixels = images_to_tensor(sample_training_batch(self.cfg.vae_batch_size, rng, include_held_out=True)[0])
            loss, optimizer = _vae_loss(self.comps, pixels.to(self.device), generator), self.vae_opt
            params = self.comps.vae.parameters()
        else:
            if self.step == self.cfg.vae_steps:
                self._calibrate_latent_scale()
            if self.step == self.focus_start:
                self._start_focus_stage()
            stage = 3 if self.step >= self.focus_start else 2
            loss, optimizer, params = _unet_loss(self.comps, self.cfg, stage, self.step), self.opt, self.unet_params
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss {loss.item()} at pretraining step {self.step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.step >= self.cfg.vae_steps:
            self.lr_schedule.step()
            self.ema.step(self.unet_params)
        return loss.item()

    def _start_focus_stage(self) -> None:
        """Restart the learning-rate schedule: a warm-up and cosine decay from `focus_lr` over stage 3."""
        for group in self.opt.param_groups:
            group["initial_lr"] = group["lr"] = self.cfg.focus_lr
        self.lr_schedule = get_scheduler(
            "cosine", self.opt, num_warmup_steps=self.cfg.warmup_steps, num_training_steps=self.cfg.focus_steps
        )

    @torch.no_grad()
    def _calibrate_latent_scale(self) -> None:
        """Set the VAE scaling factor so latents have unit variance, as Stable Diffusion does."""
        rng, generator = _batch_rng(self.cfg, 0, 0)
        pixels = images_to_tensor(sample_training_batch(256, rng)[0]).to(self.device)
        latents = self.comps.vae.encode(pixels).latent_dist.sample(generator)
        self.comps.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))

    def final_components(self) -> Components:
        """The components with EMA weights copied in."""
        self.ema.copy_to(self.unet_params)
        return self.comps

    def _checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def _save_checkpoint(self) -> None:
        with atomic_directory(self._checkpoint_dir()) as tmp:
            self.comps.save_pretrained(tmp / "model")
            state = {
                "vae_opt": self.vae_opt.state_dict(), "opt": self.opt.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(), "ema": self.ema.state_dict(),
            }
            save_torch_state(state, tmp / "training_state.pt")
            (tmp / "progress.json").write_text(json.dumps({"step": self.step, "log": self.log}))

    def _maybe_resume(self) -> None:
        ckpt = self._checkpoint_dir()
        if not (ckpt / "progress.json").is_file():
            return
        saved = Components.from_pretrained(ckpt / "model")
        self.comps.tokenizer = saved.tokenizer  # the ids the text encoder was trained with
        for name, module in self.comps.modules().items():
            module.load_state_dict(saved.modules()[name].state_dict())
        self.comps.vae.register_to_config(scaling_factor=saved.vae.config.scaling_factor)
        progress = json.loads((ckpt / "progress.json").read_text())
        self.step, self.log = progress["step"], progress["log"]
        if self.step > self.focus_start:
            self._start_focus_stage()
        state = load_torch_state(ckpt / "training_state.pt")
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.opt.load_state_dict(state["opt"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.ema.load_state_dict(state["ema"])
        self.ema.to(self.device)  # its shadow weights load on the CPU


def pretrain_toy(cfg: ToyPretrainConfig, out_dir: str | Path, device: torch.device | str = "cpu") -> Path:
    """Train the toy model on `device` (resuming from `out_dir/checkpoint`), then write `out_dir/model` and a
    sample grid."""
    from mima.sampling import sample_images, save_grid
    from mima.toy.world import toy_concepts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_json(out_dir / "pretrain_config.json")
    trainer = ToyPretrainer(cfg, out_dir, device)
    components = trainer.train()
    model_dir = components.save_pretrained(out_dir / "model")
    save_tokenizer(components.tokenizer, model_dir / "tokenizer")
    prompts = [c.prompts[0] for c in toy_concepts() for _ in range(4)]
    save_grid(sample_images(components, prompts, seed=cfg.seed), out_dir / "samples.png", columns=8)
    (out_dir / "pretrain_log.json").write_text(json.dumps(trainer.log))
    return model_dir
