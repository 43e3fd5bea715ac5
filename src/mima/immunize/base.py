"""The Immunizer interface, its configuration, and the `immunizers` registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from mima.data.concepts import ConceptSpec
from mima.functional import Params
from mima.immunize.config import ImmunizeConfig
from mima.models.components import Components
from mima.models.encoding import Batch, EncodedConcept, EncodedImages
from mima.registry import Registry
from mima.utils.distributed import Shard

ConceptBatches = dict[str, tuple[Batch, Batch]]  # concept name -> (lower batch x^l, upper batch x^u)
RetainedConcept = tuple[ConceptSpec, EncodedConcept]  # a concept the retain term keeps learnable, encoded


class Immunizer(ABC):
    """An immunization method. Closed-form methods do all their work in `prepare` (`iterative = False`)."""

    iterative: ClassVar[bool] = True
    depends_on: ClassVar[tuple[str, ...] | None] = None
    """The config fields that decide this method's result (None: all but `save_every`, `gradient_checkpointing`,
    `concept_by_concept`, `kept_gradients` and `fused_batches`); a benchmark reuses a finished model only if they
    match."""

    def __init__(self, config: ImmunizeConfig) -> None:
        self.config = config.for_setting()  # what the setting decides, for an immunizer made without a run
        self.shard = Shard()  # this process's share of the concepts (the trainer sets it under torchrun)
        self.retained: list[RetainedConcept] = []  # `retain_concepts`, encoded (the trainer sets them)
        self.bank: EncodedImages | None = None  # the bank prior's images, encoded (the trainer sets them)
        self.unconditional: torch.Tensor | None = None  # the empty prompt's conditioning (1, T, d), likewise
        self.original: Params = {}  # S^u before the first outer step, the bank prior's teacher (the trainer sets it)
        self.fused = 1  # batches at one set of weights per UNet call (`BilevelImmunizer.fuse_batches`)

    @classmethod
    def deciding_fields(cls, config: ImmunizeConfig) -> list[str]:
        """The fields of `config` that decide this method's result: `depends_on`, or all but how it is computed."""
        how = ("save_every", "gradient_checkpointing", "concept_by_concept", "kept_gradients", "fused_batches")
        return list(cls.depends_on or [name for name in config.to_dict() if name not in how])

    @abstractmethod
    def prepare(self, components: Components, specs: list[ConceptSpec], concepts: list[EncodedConcept]) -> None:
        """Bind to the model (in place) and precompute what the steps need."""

    def begin_step(self, step: int) -> dict[str, float]:
        """Called before outer step `step` (0-based) with nothing drawn from its generator; returns values to log
        (nothing by default; the bi-level methods sample the step's simulated attacker)."""
        return {}

    def end_step(self, logs: dict[str, float]) -> None:
        """Called after an outer step's gradients with its logs (nothing by default; the bi-level methods count its
        upper losses toward the next steps' focus)."""
        return None

    def state(self) -> dict[str, torch.Tensor]:
        """What besides S^u and the optimizer a checkpoint must hold for an exact resume (nothing by default)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state` returned (nothing to restore by default)."""
        return None

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The upper-level parameters S^u (name -> parameter) the trainer optimises."""
        return {}

    def objective(self, batches: ConceptBatches, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The quantity to MINIMISE at one outer step (differentiable in S^u), and per-concept logs."""
        raise NotImplementedError(f"{type(self).__name__} is not iterative")

    def gradients(
        self, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
        """The value of `objective` and its gradient on S^u (name -> tensor), computed by the method itself
        (the outer loop sets them as `.grad` and steps), and the logs."""
        raise NotImplementedError(f"{type(self).__name__} is not iterative")


immunizers: Registry[Immunizer] = Registry("immunizer", Immunizer)
