"""Parameter-dict helpers: the UNet as a pure function of its parameters, and the differentiable inner step."""

from __future__ import annotations

from typing import Literal

import torch
from torch.func import functional_call

from mima.losses import UNetCall

Params = dict[str, torch.Tensor]
Order = Literal["first-order", "second-order"]


def unet_call_with(unet: torch.nn.Module, params: Params) -> UNetCall:
    """The UNet evaluated with `params` substituted for its own (others unchanged), as a `UNetCall`."""

    def call(noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return functional_call(unet, params, (noisy, timesteps), {"encoder_hidden_states": hidden}).sample

    return call


def sgd_step(params: Params, loss: torch.Tensor, lr: float, order: Order, max_norm: float = 0.0) -> Params:
    """One SGD step theta' = theta - lr * grad, as a new dict; the only first/second-order switch.

    Second order keeps the graph (theta' is differentiable in theta through the gradient); first order
    detaches the gradient, so d theta' / d theta = I. `max_norm` > 0 scales the gradient down to that global
    norm, as the attacks clip theirs; the scale is differentiated like the rest.
    """
    second_order = order == "second-order"
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
    if not second_order:
        grads = [g.detach() for g in grads]
    if max_norm > 0:
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        scale = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
        grads = [g * scale for g in grads]
    return {name: p - lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
