"""Shared machinery of the bi-level immunizers (MIMA, IMMA, imma-joint, imma-each): S^l, S^u, inner step, objective."""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch

from mima.data.concepts import ConceptSpec
from mima.functional import (
    BatchLosses,
    Params,
    Unrolled,
    accumulate,
    add_grads,
    divided,
    inner_step,
    tensor_bytes,
    unet_call_with,
    unroll,
    unrolled_vjp,
)
from mima.immunize.ascent import AscentTerms, Focus
from mima.immunize.attackers import SimulatedAttacker
from mima.immunize.base import ConceptBatches
from mima.immunize.distribution import AttackerDistribution
from mima.immunize.preservation import PreservationTerms
from mima.losses import denoising_losses, diffusion_loss, draw_noise
from mima.models.components import Components
from mima.models.cross_attention import differentiable_attention, enable_gradient_checkpointing, select_parameters
from mima.models.encoding import Batch, EncodedConcept
from mima.utils.device import GraphBytes, peak_memory_bytes


class BilevelImmunizer(AscentTerms, PreservationTerms):
    """max over S^u of the upper loss of adapted copies (docs/method.md), minus a prior-preservation term.

    Subclasses define `adapted_parameters`: how the simulated attacker's copies are made and combined. The
    attacker (`self.attacker`, a `SimulatedAttacker`, the one `begin_step` sampled from `self.distribution`)
    decides what each copy trains, how, and at which points of its trajectory the upper loss is
    taken (`AttackerSpec.trajectory_steps`; first order only when more than the last).
    With `splits_concepts`, `upper_gradient` does only this process's concepts (`self.shard`) and returns its share
    of the gradient, which `gradients` sums over processes; otherwise every process computes all of it.
    """

    splits_concepts: ClassVar[bool] = False

    def prepare(self, components: Components, specs: list[ConceptSpec], concepts: list[EncodedConcept]) -> None:
        self.unet, self.scheduler = components.unet, components.scheduler
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(self.unet)
        names = [name for name, _ in self.unet.named_parameters()]
        self.unet_names = frozenset(names)
        self.lower_names = select_parameters(names, self.config.lower_params, what="lower-level (S^l)")
        self.upper_names = select_parameters(names, self.config.upper_params, what="upper-level (S^u)")
        self.unet.requires_grad_(False)
        # The kept gradients' budget is relative, since a fixed one is all of a small model's step and none of a large
        # one's; and taken before the steps, so that what they keep does not raise it.
        self.memory_before_steps = (peak_memory_bytes(self.unet.device)
                                    or tensor_bytes(self.unet.parameters()))  # where there is no peak measure
        for name, param in self.unet.named_parameters():
            param.requires_grad_(name in self.upper_names)
        self.fused = self.fuse_batches(concepts)
        self.distribution = AttackerDistribution(self.config, components, specs, self.lower_names,
                                                 [spec for spec, _ in self.retained])
        self.class_of = {spec.name: (spec.class_prompt, spec.class_images) if self.config.class_batches == "per-class"
                         else spec.name for spec in specs}
        self.focus = Focus(list(self.protected(dict.fromkeys(spec.name for spec in specs))), self.config.upper_focus)

    @property
    def attacker(self) -> SimulatedAttacker:
        """The simulated attacker of the current outer step."""
        return self.distribution.attacker

    def begin_step(self, step: int) -> dict[str, float]:
        """Sample outer step `step`'s attacker from the distribution; logged as `attacker`, its index in
        `attacker_specs()`, `token`, its fresh token's index in its `tokens`, and with `upper_focus` each concept's
        weight in the ascent (`focus/NAME`)."""
        return {**self.distribution.sample(step), **self.focus.logs()}

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.distribution.state(), **self.focus.state()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.focus.load(state)
        self.distribution.load({name: t for name, t in state.items() if name not in self.focus.state_names},
                               self.unet.device)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.unet.named_parameters() if name in self.upper_names}  # upper_names' order

    def base_parameters(self) -> Params:
        """theta^{k-1} restricted to S^l and S^u: upper parameters as they are, other lower ones as fresh leaves."""
        module_params = dict(self.unet.named_parameters())
        base = {name: module_params[name] for name in self.upper_names}
        for name in self.lower_names:
            base.setdefault(name, module_params[name].detach().requires_grad_())
        return base

    def loss(self, params: Params, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The diffusion loss of the UNet with `params` substituted."""
        call = unet_call_with(self.unet, params)
        return diffusion_loss(call, self.scheduler, batch.latents, batch.hidden, generator=generator)

    def attacked_loss(
        self, params: Params, batch: Batch, generator: torch.Generator, concept: int | None
    ) -> torch.Tensor:
        """The simulated attacker's loss at `params` = `{**base, **phi}` on `batch` of concept index `concept`."""
        return self.attacked_losses(params, [batch], [draw_noise(self.scheduler, batch.latents, generator)],
                                    [concept])[0]

    def attacked_losses(
        self, params: Params, batches: Sequence[Batch], draws: Sequence[tuple[torch.Tensor, torch.Tensor]],
        concepts: Sequence[int | None],
    ) -> torch.Tensor:
        """`attacked_loss` of each of `batches` under its drawn noise and timesteps, through the UNet in one call."""
        weights = {name: p for name, p in params.items() if name in self.unet_names}
        return self.fused_losses({**weights, **self.attacker.weights(params)}, [params] * len(batches), batches,
                                 draws, concepts)

    def own_copies(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[list[list[Params]], dict[str, float]]:
        """Each concept's own copy (the attacker on its lower batch alone): every copy's phi at each point, logs."""
        trajectories, logs = [], {}
        for n, (name, (lower, _)) in enumerate(batches.items()):
            trajectory, logs[f"lower/{name}"] = self.adapt_trajectory(base, [lower], [n], generator)
            trajectories.append(trajectory)
        return [list(phis) for phis in zip(*trajectories, strict=True)], logs

    def adapt_trajectory(
        self, base: Params, batches: list[Batch], concepts: Sequence[int | None], generator: torch.Generator
    ) -> tuple[list[Params], float]:
        """The simulated attacker: its inner steps from phi_0 on the mean loss of `batches` (of `concepts`), with
        their graph (second order). Returns phi at each point of the trajectory (`AttackerSpec.trajectory_steps`;
        the adapted phi last) and the first lower-level loss."""
        spec, losses, adam = self.attacker.spec, [], None
        phi = self.distribution.start(base, concepts, generator)
        trajectory = [phi] if 0 in spec.trajectory_steps else []
        with self.double_backward_attention():
            for step in range(spec.steps):
                loss = torch.stack([self.attacked_loss({**base, **phi}, b, generator, c)
                                    for b, c in zip(batches, concepts, strict=True)]).mean()
                phi, adam = inner_step(phi, loss, self.attacker.lr, spec.order, spec.clip, spec.optimizer, adam)
                losses.append(loss.item())
                if step + 1 in spec.trajectory_steps:
                    trajectory.append(phi)
        self.distribution.carry(concepts, phi, base)
        return trajectory, losses[0]

    def batch_losses(self, batches: list[Batch], concepts: Sequence[int | None]) -> BatchLosses:
        """The attacker's losses of `batches` as a function of the parameters (`{**base, **phi}`) and the generator,
        `fused` batches to a UNet call (one where the exact product differentiates them twice: `fused` is sized by a
        first-order graph)."""

        def losses(params: Params, generator: torch.Generator, group: Sequence[int]) -> torch.Tensor:
            draws = [draw_noise(self.scheduler, batches[i].latents, generator) for i in group]
            return self.attacked_losses(params, [batches[i] for i in group], draws, [concepts[i] for i in group])

        twice = self.attacker.spec.order == "second-order" and self.config.hvp == "exact"
        return BatchLosses(losses, len(batches), 1 if twice else self.fused)

    def fused_losses(
        self, weights: Params, conditioning: Sequence[Params], batches: Sequence[Batch],
        draws: Sequence[tuple[torch.Tensor, torch.Tensor]], concepts: Sequence[int | None], teacher: bool = False,
    ) -> torch.Tensor:
        """Each batch's loss with the UNet's `weights`, under its drawn noise and timesteps, conditioned as the
        attacker conditions its concept at its `conditioning` parameters: through the UNet in one call. With
        `teacher`, against `teacher_prediction` instead of the noise."""
        targets = None if not teacher else [
            self.teacher_prediction(batch, *drawn) for batch, drawn in zip(batches, draws, strict=True)]
        return denoising_losses(unet_call_with(self.unet, weights), self.scheduler, [
            (batch.latents, *drawn, self.attacker.hidden(params, batch, concept))
            for batch, drawn, params, concept in zip(batches, draws, conditioning, concepts, strict=True)], targets)

    def unroll(
        self, base: Params, batches: list[Batch], concepts: Sequence[int | None], generator: torch.Generator, *,
        keep_last: bool = True, keeps_gradients: bool = True,
    ) -> Unrolled:
        """`adapt_trajectory`'s values (same numbers, same draws from `generator`), keeping at most the last batch's
        graph (second order, `keep_last`), which `unrolled_vjp` then uses instead of replaying that batch; for a
        finite-difference product that will reuse them (`keeps_gradients`), each step's gradient covers S^u too."""
        spec = self.attacker.spec
        second_order = spec.order == "second-order"
        keep = keep_last and second_order and self.config.hvp == "exact"
        phi = self.distribution.start(base, concepts, generator)
        with self.double_backward_attention() if keep else nullcontext():
            run = unroll(phi, base, self.batch_losses(batches, concepts), generator, steps=spec.steps,
                         lr=self.attacker.lr, max_norm=spec.clip, keep=self.upper_names if keep else None,
                         optimizer=spec.optimizer, record=spec.trajectory_steps, replay=second_order,
                         also=self.upper_names if second_order and keeps_gradients and self.reuses_inner_gradients()
                         else ())
        self.distribution.carry(concepts, run.params, base)
        return run

    def reuses_inner_gradients(self) -> bool:
        """Whether finite-difference products reuse the gradients the inner steps took: not for an exact product,
        nor under autocast, where the product recomputes them in float32."""
        return self.config.hvp == "finite-difference" and not torch.is_autocast_enabled(self.unet.device.type)

    def spare_gradient_bytes(self) -> int:
        """The memory the copies' inner-step gradients may keep until their finite-difference products reuse them
        (`kept_gradients` of the run's peak memory before its first outer step, `prepare`)."""
        return int(self.config.kept_gradients * self.memory_before_steps) if self.reuses_inner_gradients() else 0

    def unrolled_vjp(
        self, run: Unrolled, base: Params, batches: list[Batch], concepts: Sequence[int | None],
        generator: torch.Generator, cotangent: Params,
    ) -> Params:
        """The gradient on S^u of <cotangent, adapted phi>, replaying `run` batch by batch (`unrolled_vjp`)."""
        spec, exact = self.attacker.spec, self.config.hvp == "exact"
        with self.double_backward_attention() if exact else nullcontext():
            return unrolled_vjp(run, base, self.batch_losses(batches, concepts), generator, cotangent,
                                self.upper_names, lr=self.attacker.lr, max_norm=spec.clip, order=spec.order,
                                hvp=self.config.hvp)

    def attack_gradient(
        self, run: Unrolled, base: Params, kept: Params, batches: list[Batch], concepts: Sequence[int | None],
        generator: torch.Generator, weight_grads: Params, phi_grads: Params,
    ) -> Params:
        """The gradient on S^u reaching it through one attack, from the gradient on the weights it changed and on
        its phi (`kept`: what the attacker kept of its adapted phi)."""
        cotangent, direct = self.attacker.pull_back(base, kept, weight_grads, self.upper_names)
        return add_grads(direct, self.unrolled_vjp(run, base, batches, concepts, generator,
                                                    add_grads(cotangent, phi_grads)))

    def double_backward_attention(self) -> AbstractContextManager[None]:
        """The plain-math attention kernel where the inner step is differentiated twice (second order only)."""
        return differentiable_attention() if self.attacker.spec.order == "second-order" else nullcontext()

    def mean_loss_gradient(
        self, params: Params, batches: list[Batch], generator: torch.Generator, wrt: list[str],
        owned: Sequence[bool] | None = None, phis: Sequence[Params] | None = None,
        concepts: Sequence[int | None] | None = None, upper: bool = False, teacher: bool = False,
    ) -> tuple[list[float], Params, list[Params]]:
        """Each batch's loss at `params`, the gradient of their mean on the names `wrt` and on each batch's phi.

        With `phis` and `concepts`, batch n is conditioned as the attacker conditions concept `concepts[n]` at
        `phis[n]`. With `owned`, only the owned batches count (the others' draws are made and dropped, their losses
        are 0.0). With `upper`, they are the ascent's, batch n concept `concepts[n]`'s: contrasted
        (`contrasted_losses`), capped (`counted`: a batch above `upper_cap` gives no gradient) and weighted (`focus`).
        With `teacher`, against the original model's prediction. The batches go through the UNet in groups of `fused`
        (`fuse_batches`), one group's graph alive at a time."""
        cap, contrast = (self.config.upper_cap, self.config.upper_contrast) if upper else (0.0, 0.0)
        shares = torch.ones(len(batches), dtype=torch.float64)
        if upper:
            shares = self.focus.weights()[list(concepts) if concepts is not None else slice(None)]
        leaves = {name: params[name].detach().requires_grad_() for name in wrt}
        weights = {**params, **leaves}
        draws = [draw_noise(self.scheduler, batch.latents, generator) for batch in batches]  # as one call each would
        owned_indices = [index for index in range(len(batches)) if owned is None or owned[index]]
        losses, phi_grads, grads = [0.0] * len(batches), [{} for _ in batches], {}
        fused = max(1, self.fused // 2) if contrast else self.fused  # a contrasted batch is two through the UNet
        for start in range(0, len(owned_indices), fused):
            group = owned_indices[start:start + fused]
            phi = [{n: p.detach().requires_grad_() for n, p in (phis[i] if phis else {}).items()} for i in group]
            values = self.contrasted_losses(
                weights, [{**weights, **part} for part in phi], [batches[i] for i in group], [draws[i] for i in group],
                [concepts[i] if concepts else None for i in group], contrast, teacher)
            found = values.tolist()
            counted = [k for k, value in enumerate(found) if not 0 < cap < value]  # above: the constant cap
            for i, value in zip(group, found, strict=True):
                losses[i] = min(value, cap) if cap > 0 else value
            if not counted:
                continue
            named = {**{(None, n): p for n, p in leaves.items()},  # (index in group or None, name)
                     **{(k, n): p for k in counted for n, p in phi[k].items()}}
            weighted = values[counted] * shares[group][counted].to(values)
            results = torch.autograd.grad(weighted.sum() / len(batches), list(named.values()), allow_unused=True)
            for (k, name), grad in zip(named, results, strict=True):
                if grad is not None and k is None:
                    accumulate(grads, {name: grad})
                elif grad is not None:
                    phi_grads[group[k]][name] = grad
        return losses, {name: grads.get(name, torch.zeros_like(p)) for name, p in leaves.items()}, phi_grads

    def fuse_batches(self, concepts: list[EncodedConcept]) -> int:
        """How many batches at one set of weights go through the UNet together (`mean_loss_gradient`): as many as
        their graph, measured on one batch, fits in `fused_batches` times the UNet parameters' memory (not the peak:
        so every process and a resumed run fuse alike), and at least one."""
        if self.config.fused_batches == 0 or not concepts:
            return 1
        batch = concepts[0].batch(self.config.batch_size, torch.Generator().manual_seed(0))
        like = {"device": self.unet.device, "dtype": self.unet.dtype}
        with GraphBytes(self.unet.parameters()) as graph:
            self.loss({}, Batch(batch.latents.to(**like), batch.hidden.to(**like)), torch.Generator().manual_seed(0))
        budget = self.config.fused_batches * tensor_bytes(self.unet.parameters())
        return max(1, int(budget) // max(graph.bytes, 1))

    def adapted_loss_gradient(
        self, base: Params, lowers: list[Batch], uppers: list[Batch], concepts: Sequence[int | None],
        generator: torch.Generator, upper: bool = False, teacher: bool = False,
    ) -> tuple[list[float], Params, float]:
        """The losses of `uppers` after one simulated attack on all of `lowers` (of `concepts`, the same for both;
        imma-joint, the retain term), the gradient of their mean on S^u (`point_gradient`), and the first
        lower-level loss; each averaged over the attack's trajectory points."""
        run = self.unroll(base, lowers, concepts, generator)
        points, losses, grads = len(run.trajectory), [0.0] * len(uppers), {}
        for phi in run.trajectory:
            point_losses, point_grads = self.point_gradient(run, base, phi, lowers, uppers, concepts, generator,
                                                            upper, teacher)
            grads = add_grads(grads, divided(point_grads, points))
            losses = [total + loss / points for total, loss in zip(losses, point_losses, strict=True)]
        return losses, grads, run.first_loss

    def point_gradient(
        self, run: Unrolled, base: Params, phi: Params, lowers: list[Batch], uppers: list[Batch],
        concepts: Sequence[int | None], generator: torch.Generator, upper: bool = False, teacher: bool = False,
    ) -> tuple[list[float], Params]:
        """At `phi` of `run` (an attack on `lowers`): the losses of `uppers`, their mean's gradient on S^u with it."""
        kept, changed = self.attacker.kept(phi), self.attacker.weights({**base, **phi})
        wrt = list(dict.fromkeys([*changed, *self.upper_names]))
        losses, grads, phi_grads = self.mean_loss_gradient(
            {**base, **changed}, uppers, generator, wrt, phis=[kept] * len(uppers), concepts=concepts, upper=upper,
            teacher=teacher)
        direct = {n: grads[n] for n in self.upper_names if n not in changed}  # S^u the attack leaves
        pulled = self.attack_gradient(run, base, kept, lowers, concepts, generator, {n: grads[n] for n in changed},
                                      functools.reduce(add_grads, phi_grads, {}))
        return losses, add_grads(pulled, direct)

    @abstractmethod
    def upper_gradient(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[list[float], Params, dict[str, float]]:
        """Each concept's upper loss, the gradient of their mean on S^u and the lower-level losses to log,
        concept by concept."""

    def gradients(
        self, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[float, Params, dict[str, float]]:
        """The value of `objective` and its gradient on S^u, computed so that at most one concept's double-backward
        graph is alive at a time (same numbers and draws as differentiating `objective`), or, without
        `concept_by_concept`, by differentiating `objective` with every concept's graph at once (faster)."""
        if not self.config.concept_by_concept:
            ascent, terms, logs = self.objective_parts(batches, generator)
            objective, params = sum(terms, ascent), self.trainable_parameters()
            parts = [ascent, sum(terms)] if self.projects and terms else [objective]
            grads = [dict(zip(params, torch.autograd.grad(part, list(params.values()), retain_graph=True),
                              strict=True)) for part in parts]
            return objective.item(), self.combined(grads[0], grads[1:]), logs
        batches = self.protected(batches)
        base = {name: p.detach() for name, p in self.base_parameters().items()}
        uppers, grads, logs = self.upper_gradient(base, batches, generator)
        if self.splits_concepts:  # each process's share, summed (a name missing from a share counts as zero)
            grads = {name: grads[name] if name in grads else torch.zeros_like(base[name]) for name in self.upper_names}
            uppers, grads, logs = self.shard.sum_floats(uppers), self.shard.sum(grads), self.shard.gather_logs(logs)
        objective, grads = -self.weighted_mean(uppers), {name: -g for name, g in grads.items()}  # uppers: counted
        logs.update({f"upper/{name}": loss for name, loss in zip(batches, uppers, strict=True)})
        terms = []
        for name, (losses, term_grads) in self.preservation_gradients(base, batches, generator):
            weight, value = getattr(self.config, f"{name}_weight"), sum(losses) / max(len(losses), 1)
            objective += weight * value
            terms.append({n: weight * g for n, g in term_grads.items()})
            logs[name] = value
        return objective, self.combined(grads, terms), logs

    @abstractmethod
    def adapted_parameters(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[list[tuple[list[Params], list[Params]]], dict[str, float]]:
        """At each point of the attacker's trajectory (`AttackerSpec.trajectory_steps`, the end last): each protected
        concept's theta' (the weights its upper loss is taken at: after the attack and, for MIMA, the Merge) and
        phi (what conditions its upper loss); and the lower-level losses to log."""

    def protected(self, batches: ConceptBatches) -> ConceptBatches:
        """The concepts whose upper loss is maximised (all of them, except for single-concept IMMA)."""
        return batches

    def objective(self, batches: ConceptBatches, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        ascent, terms, logs = self.objective_parts(batches, generator)
        return sum(terms, ascent), logs

    def objective_parts(
        self, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, float]]:
        """The objective's parts: the ascent's (minus the mean upper loss) and each preservation term, weighted."""
        batches = self.protected(batches)
        base = self.base_parameters()
        points, lower_logs = self.adapted_parameters(base, batches, generator)
        upper: dict[str, torch.Tensor] = {}
        for thetas, phis in points:  # the mean over the trajectory's points of each concept's counted loss
            for n, ((name, (_, up)), theta, phi) in enumerate(zip(batches.items(), thetas, phis, strict=True)):
                adapted = {**base, **theta}
                drawn = draw_noise(self.scheduler, up.latents, generator)
                loss = self.counted(self.contrasted_losses(adapted, [{**adapted, **phi}], [up], [drawn], [n],
                                                           self.config.upper_contrast)[0])
                upper[name] = upper.get(name, 0.0) + loss / len(points)
        logs = {**lower_logs, **{f"upper/{name}": loss.item() for name, loss in upper.items()}}
        terms = []
        for name in ("prior", "anchor", "retain", "bank_prior"):  # as `preservation_gradients` yields them
            if (weight := getattr(self.config, f"{name}_weight")) > 0:
                value = getattr(self, f"{name}_loss")(base, batches, generator)
                terms.append(weight * value)
                logs[name] = value.item()
        ascent = torch.stack(list(upper.values()))
        return -(ascent * self.focus.weights().to(ascent)).mean(), terms, logs
