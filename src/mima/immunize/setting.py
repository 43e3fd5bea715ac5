"""What the setting (relearn or personalize) makes the default of the settings left unset (light to import)."""

from __future__ import annotations

from typing import Literal

Setting = Literal["relearn", "personalize"]

# settings that act only inside a term: the term's weight, and what they are to it
FOR_A_TERM = {
    "retain_attackers": ("retain_weight", "attack for the retain term"),
    "retain_concepts": ("retain_weight", "are images for the retain term"),
    "bank_prior_unconditional": ("bank_prior_weight", "is a share of the bank prior's images"),
}

# With held-out targets, the retain term's own Textual Inversion, weighted more, and the bank prior under the empty
# prompt keep the concepts no term names learnable by a new word; with erased targets they cost the protection
# against a LoRA under a new word (docs/efficacy.md, "Held-out targets: the personalize defaults").
_RETAIN_TEXTUAL_INVERSION = {"kind": "textual-inversion", "optimizer": "adam", "lr": 0.02, "steps": 1,
                             "order": "first-order", "trajectory_start": True}
SETTING_DEFAULTS: dict[str, dict[str, object]] = {
    "relearn": {"retain_weight": 3.0, "retain_attackers": (), "bank_prior_weight": 5.0,
                "bank_prior_unconditional": 0.0},
    "personalize": {"retain_weight": 6.0, "retain_attackers": (_RETAIN_TEXTUAL_INVERSION,),
                    "bank_prior_weight": 10.0, "bank_prior_unconditional": 1.0},
}
