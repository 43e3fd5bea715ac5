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


def sgd_step(params: Params, loss: torch.Tensor, lr: float, order: Order) -> Params:
    """One SGD step theta' = theta - lr * grad, as a new dict; the only first/second-order switch.

    Second order keeps the graph (theta' is differentiable in theta through the gradient); first order
    detaches the gradient, so d theta' / d theta = I.
    """
    second_order = order == "second-order"
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
    return {
        name: p - lr * (g if second_order else g.detach())
        for (name, p), g in zip(params.items(), grads, strict=True)
    }
