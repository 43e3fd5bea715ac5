"""AttackerSpec: one simulated attacker of the lower level, as `ImmunizeConfig.attackers` lists them (light to
import: the CLI builds its flags from it)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mima.attacks.config import CONCEPT_PROMPT, FRESH_TOKEN_PROMPT
from mima.config import Config
from mima.errors import ConfigError

DESCRIPTION_PROMPT = "description"  # simulated attackers only: each image under one of its concept's descriptions
InnerOptimizer = Literal["sgd", "adam"]
# The shipped simulated attackers (docs/efficacy.md, "The shipped defaults"): half the outer steps a LoRA under the
# concept's own prompt, half one taught a fresh token drawn from rare words ("sks", the attacks' default, not among
# them), so that the protection does not attach to the concept's words or to one token.
RARE_TOKENS = ("zq", "vkx", "qjx", "pxw", "bzv", "jxq", "wqz", "xvj")
DEFAULT_ATTACKERS = ({"kind": "lora"}, {"kind": "lora", "prompt": "fresh-token", "tokens": list(RARE_TOKENS)})
AttackerOrder = Literal["inherit", "second-order", "first-order"]


@dataclass(frozen=True)
class AttackerSpec(Config):
    """One simulated attacker of the lower level (docs/method.md, "Simulated attackers"): what it trains and how.

    In `ImmunizeConfig.attackers`, an entry that leaves out steps, clip or order takes the run's `inner_steps`,
    `inner_clip` and `order`; one that leaves out lr, the kind's own default (`SimulatedAttacker.default_lr`).
    """

    kind: str = field(default="full", metadata={"help": "what it trains (see `mima ls simulated-attackers`)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate of its inner steps (default: the kind's)"})
    steps: int = field(default=1, metadata={"help": "inner steps"})
    clip: float = field(default=1.0, metadata={"help": "max gradient norm of each inner step (0: off)"})
    rank: int = field(default=4, metadata={"help": "lora: adapter rank"})
    prompt: str | None = field(
        default=None,
        metadata={"help": "what its images are captioned with, for its steps and the upper loss: 'concept' (the "
                          "concept's own prompts; a learned token is added beside its words) or 'fresh-token' (the "
                          "words naming the concept replaced by a token: the learned one, else the untrained 'sks') "
                          "or 'description' (full, lora: each image under one of the concept's `descriptions`, which "
                          "describe it without naming it); default: fresh-token for textual-inversion, concept for "
                          "the others, as the attacks"},
    )
    tokens: tuple[str, ...] = field(
        default=(),
        metadata={"help": "fresh-token, kinds that learn no token (full, lora): the rare words its token is drawn "
                          "from, one per outer step (seeded by the run's seed and the step), so that protection "
                          "cannot attach to one token; empty: 'sks'"},
    )
    optimizer: InnerOptimizer = field(
        default="sgd", metadata={"help": "sgd, or adam (first order only: its steps are not differentiated through)"}
    )
    weight: float = field(default=1.0, metadata={"help": "sampling weight in the distribution of attackers"})
    order: AttackerOrder = field(
        default="inherit",
        metadata={"help": "differentiate through its steps (second-order) or not (first-order); inherit: the "
                          "run's `order`"},
    )
    trajectory_points: int = field(
        default=1,
        metadata={"help": "first order: the upper loss is taken after this many evenly spaced inner steps (the last "
                          "one included) and its gradients averaged, as tamper-resistant training does"},
    )
    trajectory_start: bool = field(
        default=False,
        metadata={"help": "first order: the attack's start (before any inner step) is also a point of its "
                          "trajectory: where the real attack starts (textual-inversion: the init word in the "
                          "token's place)"},
    )

    upper_skip: tuple[str, ...] = field(default=(), metadata={
        "help": "globs of S^u weights that the outer steps drawing this attacker leave as they are, optimizer state "
                "included (e.g. the keys and values under a fresh-token attacker); empty: none"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt not in (None, CONCEPT_PROMPT, FRESH_TOKEN_PROMPT, DESCRIPTION_PROMPT):
            raise ConfigError(f"simulated attacker '{self.kind}': prompt must be '{CONCEPT_PROMPT}', "
                              f"'{FRESH_TOKEN_PROMPT}' or '{DESCRIPTION_PROMPT}', got {self.prompt!r}")
        if (self.lr is not None and self.lr <= 0) or self.steps <= 0 or self.rank <= 0 or self.weight <= 0:
            raise ConfigError(f"simulated attacker '{self.kind}': lr, steps, rank and weight must be positive")
        if self.clip < 0:
            raise ConfigError(f"simulated attacker '{self.kind}': clip must be >= 0 (0: off), got {self.clip}")
        if not 1 <= self.trajectory_points <= self.steps:
            raise ConfigError(f"simulated attacker '{self.kind}': trajectory_points must be between 1 and its steps "
                              f"({self.steps}), got {self.trajectory_points}")
        if any(len(token.split()) != 1 for token in self.tokens):
            raise ConfigError(f"simulated attacker '{self.kind}': each of tokens must be one word, got "
                              f"{list(self.tokens)}")
        if self.order == "second-order" and self.optimizer == "adam":
            raise ConfigError(f"simulated attacker '{self.kind}': Adam inner steps are first order only; give it "
                              f"order: first-order (or run with --order first-order)")
        if self.order == "second-order" and (self.trajectory_points > 1 or self.trajectory_start):
            raise ConfigError(f"simulated attacker '{self.kind}': trajectory_points > 1 and trajectory_start need "
                              f"first order; give it order: first-order (or run with --order first-order)")

    @property
    def trajectory_steps(self) -> list[int]:
        """After which inner steps (1-based; 0: the start, with `trajectory_start`) the upper loss is taken:
        `trajectory_points` evenly spaced, the last step always among them."""
        spaced = [math.ceil(k * self.steps / self.trajectory_points) for k in range(1, self.trajectory_points + 1)]
        return [0, *spaced] if self.trajectory_start else spaced

    @classmethod
    def completed(cls, entries: Sequence[object], *, steps: int, clip: float, order: str) -> list[AttackerSpec]:
        """Entries of `ImmunizeConfig.attackers` as specs, the steps, clip and order an entry leaves out (or, for the
        order, gives as `inherit`) taken from the run's."""
        specs = []
        for entry in entries:
            spec = {"steps": steps, "clip": clip, "order": order, **attacker_mapping(entry)}
            specs.append(cls.from_dict({**spec, "order": order} if spec["order"] == "inherit" else spec))
        return specs


def attacker_mapping(entry: object) -> Mapping:
    """An entry of `ImmunizeConfig.attackers` as a mapping of AttackerSpec fields (a bare kind: `{"kind": kind}`)."""
    if isinstance(entry, str):
        return {"kind": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"each simulated attacker is a kind or a mapping of its fields, got {entry!r}")
    return entry
