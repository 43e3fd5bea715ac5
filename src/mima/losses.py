"""The one diffusion training loss, shared by pretraining, every attack and every immunizer."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from mima.errors import TrainingError

# unet_call(noisy_latents, timesteps, encoder_hidden_states) -> model prediction; a callable so that
# torch.func.functional_call, peft-wrapped UNets and plain modules all fit.
UNetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def diffusion_loss(
    unet_call: UNetCall,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    prior_weight: float = 1.0,
) -> torch.Tensor:
    """Denoising MSE on freshly noised latents (epsilon- or v-prediction), with optional prior preservation.

    Args:
        unet_call (`UNetCall`): the denoiser.
        scheduler (`SchedulerMixin`): supplies the noise schedule (`add_noise`, `get_velocity`) and prediction type.
        latents (`torch.Tensor`): clean latents (B, C, H, W), already scaled by the VAE's scaling factor.
        encoder_hidden_states (`torch.Tensor`): text conditioning (B, tokens, width).
        generator (`torch.Generator`, *optional*): draws the noise and timesteps, for reproducibility.
        prior (`tuple`, *optional*): (class latents, class hidden states) for DreamBooth prior preservation.
        prior_weight (`float`, defaults to 1.0): weight of the prior term.
    """
    n_instance = latents.shape[0]
    if prior is not None:
        latents = torch.cat([latents, prior[0]])
        encoder_hidden_states = torch.cat([encoder_hidden_states, prior[1]])
    noise, timesteps = draw_noise(scheduler, latents, generator)
    errors = denoising_errors(unet_call, scheduler, latents, noise, timesteps, encoder_hidden_states)
    loss = errors[:n_instance].mean()
    if prior is not None:
        loss = loss + prior_weight * errors[n_instance:].mean()
    return loss


def draw_noise(
    scheduler: SchedulerMixin, latents: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and timesteps `diffusion_loss` draws for `latents`, from `generator`."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else None)
    noise = noise.to(device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
        device=generator.device if generator else None,
    ).to(latents.device)
    return noise, timesteps


def denoising_errors(
    unet_call: UNetCall, scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor,
    timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor, target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each image's denoising MSE (B,) with the given noise and timesteps (epsilon- or v-prediction), against
    `target` where given (a teacher's prediction), else the noise (or its velocity)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if target is None:
        target = _denoising_target(scheduler, latents, noise, timesteps)
    prediction = unet_call(noisy, timesteps, encoder_hidden_states)
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # half-precision models: MSE in float32
    return F.mse_loss(prediction.to(dtype), target.to(dtype), reduction="none").mean(dim=(1, 2, 3))


def _denoising_target(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model predicts, by its scheduler's prediction type: the noise, or its velocity."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"unsupported prediction_type '{prediction_type}'; expected 'epsilon' or 'v_prediction'")


def denoising_losses(
    unet_call: UNetCall, scheduler: SchedulerMixin,
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    targets: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each batch's mean denoising MSE, its (latents, noise, timesteps, hidden) given, through the UNet in one call:
    one larger batch, faster where a call costs mostly what its parameters cost (small latents); against each
    batch's `targets` where given (`denoising_errors`)."""
    latents, noise, timesteps, hidden = (torch.cat(part) for part in zip(*batches, strict=True))
    target = torch.cat(targets) if targets else None
    errors = denoising_errors(unet_call, scheduler, latents, noise, timesteps, hidden, target)
    return torch.stack([part.mean() for part in errors.split([batch[0].shape[0] for batch in batches])])


def distillation_loss(
    unet_call: UNetCall, teacher_call: UNetCall, scheduler: SchedulerMixin, latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor, generator: torch.Generator | None = None,
    teacher_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MSE between the predictions of `unet_call` and `teacher_call` (under `teacher_hidden_states`, default the
    same conditioning) on freshly noised `latents` (noise and timesteps drawn as `diffusion_loss` draws them): the
    denoising loss with the teacher's prediction as target. Where the teacher predicts the mean noise given the
    noised latents, its gradient is the denoising loss's in expectation, without the drawn noise's variance."""
    noise, timesteps = draw_noise(scheduler, latents, generator)
    teacher_hidden = encoder_hidden_states if teacher_hidden_states is None else teacher_hidden_states
    target = teacher_prediction(teacher_call, scheduler, latents, noise, timesteps, teacher_hidden)
    return denoising_errors(unet_call, scheduler, latents, noise, timesteps, encoder_hidden_states, target).mean()


def teacher_prediction(
    teacher_call: UNetCall, scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor,
    timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
) -> torch.Tensor:
    """`teacher_call`'s prediction on `latents` noised by `noise` at `timesteps`, without a graph: a distillation's
    target."""
    with torch.no_grad():
        return teacher_call(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states)


def unet_caller(unet: torch.nn.Module) -> UNetCall:
    """Adapt a diffusers UNet (or a peft-wrapped one) to the `UNetCall` signature."""
    return lambda noisy, t, hidden: unet(noisy, t, encoder_hidden_states=hidden).sample
