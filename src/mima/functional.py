"""Parameter-dict helpers: the UNet as a pure function of its parameters, and the differentiable inner step.

The inner step exists twice on purpose: `sgd_step` keeps its graph (the readable definition, differentiated as a
whole), while `unroll` + `unrolled_vjp` give the same gradient (exactly, or with a finite-difference
Hessian-vector product) without keeping any graph between batches, so that the memory of a meta-gradient does not
grow with the number of batches (concepts) it spans.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import functional_call

from mima.losses import UNetCall

Params = dict[str, torch.Tensor]
Order = Literal["first-order", "second-order"]
InnerOptimizer = Literal["sgd", "adam"]
Hvp = Literal["exact", "finite-difference"]


@dataclass(frozen=True)
class BatchLosses:
    """The losses of `count` batches as a function of the parameters.

    Args:
        of (`Callable`): `of(params, generator, group)`, the losses at `params` of the batches whose indices are
            `group`, through the UNet in one call, each drawing its noise and timesteps from `generator` in turn.
        count (`int`): the number of batches.
        fused (`int`, defaults to 1): how many batches one call takes (`groups`).
    """

    of: Callable[[Params, torch.Generator, Sequence[int]], torch.Tensor]
    count: int
    fused: int = 1

    def groups(self) -> list[range]:
        """The batches' indices, in calls of at most `fused`."""
        return [range(start, min(start + self.fused, self.count)) for start in range(0, self.count, self.fused)]

    def mean_part(self, params: Params, generator: torch.Generator, group: Sequence[int]) -> torch.Tensor:
        """The share of `group` in the mean loss of every batch."""
        return self.of(params, generator, group).sum() / self.count


def unet_call_with(unet: torch.nn.Module, params: Params) -> UNetCall:
    """The UNet evaluated with `params` substituted for its own (others unchanged), as a `UNetCall`."""

    def call(noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return functional_call(unet, params, (noisy, timesteps), {"encoder_hidden_states": hidden}).sample

    return call


def clip_scale(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The factor min(1, max_norm / |grads|) that scales `grads` down to global norm `max_norm`, as attacks clip."""
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    return torch.clamp(max_norm / (norm + 1e-12), max=1.0)


def sgd_step(params: Params, loss: torch.Tensor, lr: float, order: Order, max_norm: float = 0.0) -> Params:
    """One SGD step theta' = theta - lr * grad, as a new dict; the only first/second-order switch.

    Second order keeps the graph (theta' is differentiable in theta through the gradient); first order
    detaches the gradient, so d theta' / d theta = I. `max_norm` > 0 scales the gradient down to that global
    norm, as the attacks clip theirs; the scale is differentiated like the rest.
    """
    grads = _step_gradients(params, loss, order, max_norm)
    return {name: p - lr * g for (name, p), g in zip(params.items(), grads, strict=True)}


def _step_gradients(params: Params, loss: torch.Tensor, order: Order, max_norm: float) -> list[torch.Tensor]:
    if not params:  # an attack that trains nothing here (a token attacker on class images)
        return []
    second_order = order == "second-order"
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
    if not second_order:
        grads = [g.detach() for g in grads]
    if max_norm > 0:
        scale = clip_scale(grads, max_norm)
        grads = [g * scale for g in grads]
    return grads


@dataclass
class AdamState:
    """The moments of functional Adam inner steps, as plain tensors (Kingma & Ba 2015, Algorithm 1).

    Args:
        m (`Params`): first-moment estimates.
        v (`Params`): second-moment estimates.
        t (`int`): steps taken.
    """

    m: Params
    v: Params
    t: int = 0


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as the attacks use


def adam_update(params: Params, grads: Params, lr: float, state: AdamState | None) -> tuple[Params, AdamState]:
    """One Adam step of `params` along the (already clipped, detached) `grads`, as new dicts: first order only,
    since its update is not differentiated through."""
    (b1, b2), t = ADAM_BETAS, (state.t if state else 0) + 1
    m = {n: b1 * state.m[n] + (1 - b1) * g if state else (1 - b1) * g for n, g in grads.items()}
    v = {n: b2 * state.v[n] + (1 - b2) * g * g if state else (1 - b2) * g * g for n, g in grads.items()}
    stepped = {n: p - lr * (m[n] / (1 - b1**t)) / ((v[n] / (1 - b2**t)).sqrt() + ADAM_EPS)
               for n, p in params.items()}
    return stepped, AdamState(m, v, t)


def adam_step(
    params: Params, loss: torch.Tensor, lr: float, state: AdamState | None, max_norm: float = 0.0
) -> tuple[Params, AdamState]:
    """`sgd_step`'s first-order counterpart with Adam: the clipped, detached gradient of `loss`, then `adam_update`."""
    grads = _step_gradients(params, loss, "first-order", max_norm)
    return adam_update(params, dict(zip(params, grads, strict=True)), lr, state)


def inner_step(
    params: Params, loss: torch.Tensor, lr: float, order: Order, max_norm: float = 0.0,
    optimizer: InnerOptimizer = "sgd", state: AdamState | None = None,
) -> tuple[Params, AdamState | None]:
    """One step of a simulated attacker's optimizer: `sgd_step`, or `adam_step` (first order; `state` its moments)."""
    if optimizer == "adam":
        return adam_step(params, loss, lr, state, max_norm)
    return sgd_step(params, loss, lr, order, max_norm), None


@dataclass
class Unrolled:
    """SGD steps on the mean of several batch losses, kept as values only: what `unrolled_vjp` replays.

    Args:
        params (`Params`): the final parameters.
        iterates (`list[Params]`): the parameters each step started from.
        gradients (`list[Params]`): each step's mean gradient (empty after `for_replay`).
        states (`list[list[torch.Tensor]]`): the generator's state before each group of batches (`BatchLosses`)
            of each step.
        first_loss (`float`): the mean loss before the first step.
        trajectory (`list[Params]`): the parameters after each of the steps `unroll` was asked to record.
        kept (`tuple[Params, Params]`, *optional*): the leaves and graph-carrying gradient of the last group of
            the last step (its share of the mean), kept so that the VJP need not replay that group.
    """

    params: Params
    iterates: list[Params]
    gradients: list[Params]
    states: list[list[torch.Tensor]]
    first_loss: float
    trajectory: list[Params]
    kept: tuple[Params, Params] | None = None

    def for_replay(self, keep_gradients: bool = False) -> Unrolled:
        """What a VJP over ONE group of batches needs: the run without its final parameters and trajectory, and
        without its gradients (which it then recomputes) unless `keep_gradients`; so keeping one per concept costs no
        parameter copy for one inner step, and its gradients where kept."""
        return Unrolled({}, self.iterates, self.gradients if keep_gradients else [], self.states, self.first_loss,
                        [], self.kept)

    def gradient_bytes(self) -> int:
        """The memory its gradients take."""
        return sum(tensor_bytes(step.values()) for step in self.gradients)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The memory `tensors` take."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _leaves(params: Params) -> Params:
    return {name: p.detach().requires_grad_() for name, p in params.items()}


def unroll(
    params: Params, fixed: Params, losses: BatchLosses, generator: torch.Generator, *,
    steps: int, lr: float, max_norm: float = 0.0, keep: list[str] | None = None, optimizer: InnerOptimizer = "sgd",
    record: Collection[int] = (), replay: bool = True, also: Collection[str] = (),
) -> Unrolled:
    """`steps` SGD (or Adam) steps of `params` (others `fixed`) on the mean of `losses`, one group's graph at a time.

    The values equal those of `sgd_step` (`adam_step`) applied `steps` times to the stacked mean loss. With `keep`
    (the names a VJP will differentiate), the last group's gradient keeps its graph (`Unrolled.kept`): one graph
    alive, and one forward and backward fewer for the VJP. The parameters after each step in `record` (1-based;
    0: the start) are kept in `Unrolled.trajectory`. Without `replay` (first order), no iterate or gradient is kept:
    a long trajectory then holds one copy of the parameters per recorded step only. Each step's gradient also covers
    the `fixed` names `also` (not stepped), in the same backward: what a finite-difference product on them needs.
    """
    phi, iterates, gradients, states, first, kept = {n: p.detach() for n, p in params.items()}, [], [], [], None, None
    trajectory, adam, extra = [phi] if 0 in record else [], None, [n for n in also if n not in params]
    for step in range(steps):
        step_states, total, mean = [], 0.0, {}
        groups = losses.groups()
        for index, group in enumerate(groups):
            step_states.append(generator.get_state())
            keep_graph = keep is not None and step == steps - 1 and index == len(groups) - 1
            leaves = {**_leaves({n: fixed[n] for n in [*(keep or ()), *extra] if n in fixed and n not in phi}),
                      **_leaves(phi)}
            loss = losses.mean_part({**fixed, **leaves}, generator, group)
            grads = batch_gradient(loss, leaves, [*phi, *extra], create_graph=keep_graph)
            kept = (leaves, {n: grads[n] for n in phi}) if keep_graph else kept
            accumulate(mean, {name: grad.detach() for name, grad in grads.items()})  # the kept group is the last
            total += loss.item()
        first = total if first is None else first
        scale = clip_scale([mean[n] for n in phi], max_norm) if max_norm > 0 and phi else 1.0
        if replay:
            iterates.append(phi)
            gradients.append(mean)
        states.append(step_states)
        if optimizer == "adam":
            phi, adam = adam_update(phi, {n: scale * mean[n] for n in phi}, lr, adam)
        else:
            phi = {n: p - lr * scale * mean[n] for n, p in phi.items()}
        if step + 1 in record:
            trajectory.append(phi)
    return Unrolled(phi, iterates, gradients, states, first, trajectory, kept)


def batch_gradient(loss: torch.Tensor, leaves: Params, names: list[str], *, create_graph: bool) -> Params:
    """The gradient of a loss on the leaves `names`; zero on a leaf the loss does not read (another concept's token
    in a joint attack)."""
    if not names:
        return {}
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=create_graph, allow_unused=True,
                                materialize_grads=True)
    return dict(zip(names, grads, strict=True))


def _replay(generator: torch.Generator, state: torch.Tensor) -> torch.Generator:
    replay = torch.Generator(device=generator.device)
    replay.set_state(state)
    return replay


def _clipped_cotangent(cotangent: Params, mean_grad: Params, max_norm: float) -> Params:
    """u = d<cotangent, s(G) G>/dG for `clip_scale`'s s = min(1, m / (|G| + 1e-12)), in closed form (autograd over
    every parameter costs a tenth of a UNet pass): s cotangent, and where the clip acts, minus
    m <cotangent, G> / ((|G| + 1e-12)^2 |G|) G."""
    if max_norm <= 0:
        return cotangent
    names = list(mean_grad)
    flat = torch.cat([mean_grad[n].flatten() for n in names])
    norm = torch.linalg.vector_norm(flat)
    ratio = max_norm / (norm + 1e-12)
    if ratio > 1:  # unclipped: s = 1, constant
        return {n: cotangent[n] for n in names}
    dot = torch.cat([cotangent[n].flatten() for n in names]) @ flat
    along = max_norm * dot / ((norm + 1e-12) ** 2 * norm)
    return {n: ratio * cotangent[n] - along * mean_grad[n] for n in names}


def unrolled_vjp(
    run: Unrolled, fixed: Params, losses: BatchLosses, generator: torch.Generator, cotangent: Params,
    wrt: list[str], *, lr: float, max_norm: float = 0.0, order: Order = "second-order", hvp: Hvp = "exact",
) -> Params:
    """The gradient of <cotangent, run.params> with respect to the starting or fixed parameters named `wrt`.

    Second order replays each step backwards: each step's Hessian-vector product, `exact` (`_exact_hvp`: double
    backward, one group's graph alive at a time) or by a `finite-difference` of gradients (`_difference_hvp`: no
    double backward). First order treats each step's gradient as a constant: d run.params / d params = I.
    """
    lam = dict(cotangent)
    if order == "first-order" or not lam:  # not lam: the attack trained nothing
        return {n: lam[n] for n in wrt if n in lam}
    if not run.gradients and len(losses.groups()) != 1:
        raise ValueError("a run over several groups of batches needs its gradients to be replayed")
    extra = [n for n in wrt if n in fixed and n not in lam]
    fixed_grads: Params = {}
    kept = run.kept
    for step in reversed(range(len(run.iterates))):
        targets = [*(lam if step else [n for n in wrt if n in lam]), *extra]
        if hvp == "finite-difference":
            products = _difference_hvp(run, step, fixed, losses, generator, lam, targets, max_norm)
        else:
            products, kept = _exact_hvp(run, step, fixed, losses, generator, lam, targets, max_norm, kept)
        lam = {n: lam[n] - lr * products[n] for n in targets if n in lam}
        accumulate(fixed_grads, {n: products[n].mul_(-lr) for n in extra})  # the products are the step's own
    return {**{n: lam[n] for n in wrt if n in lam}, **fixed_grads}


def _exact_hvp(
    run: Unrolled, step: int, fixed: Params, losses: BatchLosses, generator: torch.Generator, lam: Params,
    targets: list[str], max_norm: float, kept: tuple[Params, Params] | None,
) -> tuple[Params, tuple[Params, Params] | None]:
    """H u on `targets` at step `step`'s iterate, u the clipped `lam`: group by group (the kept last group of the
    last step first, freeing its graph), recompute the group's share of the mean gradient with its graph and
    backpropagate through it; returns the product and what is left of `kept`."""
    extra = [n for n in targets if n not in lam]
    hvp = {n: torch.zeros_like(lam[n] if n in lam else fixed[n]) for n in targets}
    u = _clipped_cotangent(lam, {n: run.gradients[step][n] for n in lam}, max_norm) if run.gradients else None
    groups = losses.groups()
    for index in reversed(range(len(groups))):
        if kept is not None and step == len(run.iterates) - 1 and index == len(groups) - 1:
            (leaves, grads), kept = kept, None
        else:
            leaves = {**_leaves({n: fixed[n] for n in extra}), **_leaves(run.iterates[step])}
            loss = losses.mean_part({**fixed, **leaves}, _replay(generator, run.states[step][index]), groups[index])
            grads = batch_gradient(loss, leaves, list(lam), create_graph=True)
        if u is None:  # one group: its share is the step's mean gradient
            u = _clipped_cotangent(lam, {n: g.detach() for n, g in grads.items()}, max_norm)
        live = [n for n, g in grads.items() if g.requires_grad]  # not a zero for a leaf the loss ignores
        hs = torch.autograd.grad([grads[n] for n in live], [leaves[n] for n in targets], [u[n] for n in live],
                                 allow_unused=True)
        for name, h in zip(targets, hs, strict=True):
            if h is not None:  # None: that parameter's gradient does not depend on it
                hvp[name] += h
    return hvp, kept


FD_STEP = 1e-5
"""The norm of the parameter change `_difference_hvp` differentiates over, relative to the parameters' norm (at
least 1): measured on the toy and SD-shaped models, relative errors of 5e-4 to 4e-3 in the meta-gradient, where 10x
larger or smaller steps give up to 4e-2."""


def _difference_hvp(
    run: Unrolled, step: int, fixed: Params, losses: BatchLosses, generator: torch.Generator, lam: Params,
    targets: list[str], max_norm: float,
) -> Params:
    """H u on `targets` at step `step`'s iterate x, u the clipped `lam`, as (g(x + eps u) - g(x)) / eps with
    eps = FD_STEP max(|x|, 1) / |u| (DARTS, Liu et al. 2019, there with a fixed step): two gradients under the same
    draws and no double backward, so any attention kernel serves; an approximation, first order in eps."""

    def mean_gradient(point: Params, names: list[str]) -> Params:
        params, mean = {**fixed, **point}, {}
        for index, group in enumerate(losses.groups()):
            leaves = _leaves({n: params[n] for n in names})  # only these: no weight gradient for the others
            loss = losses.mean_part({**params, **leaves}, _replay(generator, run.states[step][index]), group)
            accumulate(mean, batch_gradient(loss, leaves, names, create_graph=False))
        return mean

    iterate, names = run.iterates[step], list(dict.fromkeys([*lam, *targets]))
    device = next(iter(iterate.values())).device.type
    # in float32 under autocast too: a difference of two bf16 gradients is rounding noise (measured on the toy:
    # cosine 0.07 to the exact product); so the step's gradient `unroll` kept serves only where autocast is off
    stored = run.gradients and set(names) <= set(run.gradients[step]) and not torch.is_autocast_enabled(device)
    with torch.autocast(device, enabled=False):
        at = run.gradients[step] if stored else mean_gradient(iterate, names)
        u = _clipped_cotangent(lam, {n: at[n] for n in lam}, max_norm)
        norm = torch.sqrt(sum((v * v).sum() for v in u.values()))
        if norm == 0:
            return {n: torch.zeros_like(at[n]) for n in targets}
        eps = FD_STEP * torch.clamp(torch.sqrt(sum((iterate[n] * iterate[n]).sum() for n in lam)), min=1.0) / norm
        moved = mean_gradient({n: p + eps * u[n] if n in u else p for n, p in iterate.items()}, targets)
    return {n: moved[n].sub_(at[n]).div_(eps) for n in targets}  # in place: `moved` is this function's own


def add_grads(grads: Params, more: Params) -> Params:
    """The sum of two gradient dicts (a name missing from one counts as zero)."""
    return {**more, **grads, **{name: grads[name] + g for name, g in more.items() if name in grads}}


def divided(grads: Params, count: int) -> Params:
    """`grads` / `count`, with no new tensors when `count` is 1 (a mean over one trajectory point)."""
    return grads if count == 1 else {name: g / count for name, g in grads.items()}


def accumulate(total: Params, more: Params) -> None:
    """Add `more` into `total` in place, taking a tensor of `more` as it is where `total` has none: for sums whose
    terms the caller owns, since on the CPU a new parameter-sized tensor costs more than the addition."""
    for name, tensor in more.items():
        total[name] = total[name].add_(tensor) if name in total else tensor


def without_conflict(grads: Params, other: Params) -> Params:
    """`grads` less its component along `other` where the two conflict (negative inner product over every name),
    else `grads` as it is (PCGrad, Yu et al. 2020): a descent step on `grads` then leaves the objective whose
    gradient is `other` unchanged to first order instead of raising it."""
    inner = sum((grads[n] * g).sum() for n, g in other.items() if n in grads)
    squared = sum((g * g).sum() for g in other.values())
    if not torch.is_tensor(inner) or inner >= 0 or squared == 0:
        return grads
    return add_grads(grads, {n: -(inner / squared) * g for n, g in other.items()})
