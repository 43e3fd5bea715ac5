"""ImmunizeConfig: the settings of one immunization run (light to import: the CLI builds its flags from it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from mima.config import Config
from mima.errors import ConfigError
from mima.immunize.attacker_spec import DEFAULT_ATTACKERS, DESCRIPTION_PROMPT, AttackerSpec, attacker_mapping
from mima.immunize.rate_scales import parse_rate_scale, rate_scales
from mima.immunize.setting import FOR_A_TERM, SETTING_DEFAULTS, Setting

if TYPE_CHECKING:
    from mima.data.concepts import ConceptSpec

OUTER_STEPS, OUTER_STEPS_PER_EXTRA_TARGET = 80, 12  # `steps: 0`; docs/efficacy.md, "More targets, more steps"


@dataclass(frozen=True)
class ImmunizeConfig(Config):
    """Settings of one immunization run (docs/method.md). Method-specific fields are ignored by other methods."""

    method: str = field(default="mima", metadata={"help": "immunization method (see `mima ls immunizers`)"})
    setting: Setting = field(default="relearn", metadata={"help": "relearn: erase targets first; personalize: not"})
    steps: int = field(
        default=0,
        metadata={"help": f"outer iterations K; 0: {OUTER_STEPS}, plus {OUTER_STEPS_PER_EXTRA_TARGET} per target past "
                          "three (each step ascends the targets' mean loss, so more targets climb more slowly: at "
                          f"five and ten, {OUTER_STEPS} steps barely begin the ascent)"},
    )
    outer_lr: float = field(default=5e-4, metadata={"help": "beta: AdamW learning rate of the upper-level ascent"})
    inner_lr: float = field(default=1.0, metadata={"help": "alpha: SGD step size of the simulated attacker"})
    inner_steps: int = field(default=1, metadata={"help": "unrolled SGD steps of the simulated attacker"})
    inner_clip: float = field(
        default=1.0, metadata={"help": "max gradient norm of the simulated attacker's step, as attacks clip (0: off)",
                  "absent": 0.0},  # records from before the field: unclipped
    )
    order: Literal["second-order", "first-order"] = field(
        default="second-order", metadata={"help": "differentiate through the inner step, or detach it"})
    attackers: tuple[dict | str, ...] = field(
        default=DEFAULT_ATTACKERS,
        metadata={"help": "the distribution of simulated attackers each outer step samples one from (by weight): "
                          "kinds (`--attackers full lora`) or mappings of AttackerSpec fields (kind, lr, steps, "
                          "clip, rank, prompt, tokens, optimizer, weight, order, trajectory_points, upper_skip); "
                          "what an entry leaves out comes from inner_lr, inner_steps, inner_clip and order; empty: "
                          "one 'full' attacker; default: LoRA under the concept's prompt and LoRA under a rare token "
                          "drawn per outer step (docs/efficacy.md)",
                  "absent": ()},
    )
    hvp: Literal["exact", "finite-difference"] = field(
        default="finite-difference",
        metadata={"help": "second order, concept by concept: the Hessian-vector product through the inner steps, by "
                          "a finite difference of two gradients (no double backward: any attention kernel, about a "
                          "third of the step memory; measured relative error up to 5e-3) or exact (double backward "
                          "with the plain-math attention kernel)",
                  "absent": "exact"},  # records from before the field: exact
    )
    kept_gradients: float = field(
        default=0.25,
        metadata={"help": "finite-difference products: keep each copy's inner-step gradient until its product (which "
                          "then needs one forward and backward fewer) while the kept gradients take at most this "
                          "fraction of the run's peak memory before its first outer step, so that keeping them raises "
                          "the peak by at most that fraction of it whatever the number of concepts (the toy keeps "
                          "all); 0: recompute every one"},
    )
    fused_batches: float = field(
        default=0.5,
        metadata={"help": "batches at the same weights (the upper losses at the merged weights, the prior and retain "
                          "terms' class images) go through the UNet together, as many as their graph (measured on one "
                          "batch) takes at most this many times the UNet parameters' memory: faster where a UNet call "
                          "costs mostly what its parameters cost (small latents, many concepts); where activations "
                          "dominate it fuses none; 0: one batch at a time",
                  "absent": 0.0},  # records from before the field: one at a time, so that their runs resume exactly
    )
    persistent_attacker: bool = field(default=False, metadata={
        "help": "alternating schedule (the authors' code): each attack starts where the same attacker's attack of the "
                "previous outer step ended, instead of afresh (one process only)"})
    upper_cap: float = field(default=0.0, metadata={
        "help": "bounded ascent: each concept's upper loss counts as min(L, upper_cap), so a concept above the cap "
                "pushes no further (0: off, the plain -L)"})
    upper_contrast: float = field(default=0.0, metadata={
        "help": "each concept's upper loss less this times the loss of the same images under their class prompt, at "
                "the same noise and timesteps: the ascent raises what the concept's prompt adds after the attack, "
                "not the loss of denoising such images at all (needs class images; 0: off)"})
    upper_focus: float = field(default=0.0, metadata={
        "help": "send the ascent to the targets it has raised least: each concept's upper loss weighted by N softmax("
                "-r / upper_focus), r the rise of its counted upper loss since the first step, averaged (group DRO)"})
    upper_saliency: float = field(default=0.0, metadata={
        "help": "the share of each S^u tensor the outer steps move: the entries with the largest gradient of the "
                "targets' denoising loss on the model as the immunization finds it (SalUn), so that weights every "
                "concept relies on stay (0: all of S^u)"})
    upper_saliency_against: Literal["none", "class"] = field(default="none", metadata={
        "help": "'class': rank by that gradient over the targets' class images' (weights the class needs stay)"})
    project_ascent: bool = field(default=False, metadata={
        "help": "where the ascent's gradient conflicts with the preservation terms' (negative inner product), drop "
                "its component along theirs (PCGrad, Yu et al. 2020), so that no step trades the prior, anchor and "
                "retain terms for protection to first order"})
    project_preservation: bool = field(default=False, metadata={
        "help": "the other way round: drop the preservation terms' component along the ascent's gradient where they "
                "conflict, so that no step gives up protection to keep other concepts (with project_ascent: both, "
                "each against the other's unprojected gradient, as PCGrad does between two tasks)"})
    lower_params: tuple[str, ...] = field(default=("*",), metadata={"help": "S^l: UNet parameter name globs"})
    upper_params: tuple[str, ...] = field(
        default=("*transformer_blocks*",),
        metadata={"help": "S^u: UNet parameter name globs, a '!' glob leaves out what it matches (default: every "
                          "transformer block; '*attn2.*': the cross-attention only, a quarter of the parameters the "
                          "ascent trains on SDXL, measured to protect less; configs/upper-without-keys-values.yaml: "
                          "all but the cross-attention's keys and values, measured to keep other concepts learnable "
                          "under Textual Inversion but to protect less against LoRA and DreamBooth)"},
    )
    upper_lr_scales: tuple[str, ...] = field(
        default=(),
        metadata={"help": "GLOB=SCALE entries: the S^u parameters a glob matches take SCALE times outer_lr (the last "
                          "matching entry wins; others 1); configs/keys-values-half-rate.yaml moves the "
                          "cross-attention's keys and values at 0.5x, measured between the default and leaving them "
                          "out of S^u"},
    )
    prior_weight: float = field(default=1.0, metadata={"help": "weight of the prior-preservation term (0: off)"})
    bank_prior_weight: float | None = field(
        default=None,
        metadata={"help": "weight of the bank prior: on images the original model drew for bank_prior_captions' "
                          "prompts that name no target (one batch per outer step), the released model keeps "
                          "predicting as bank_prior_target says, so that it keeps drawing what the user did not name "
                          "(0: off; default 5, with held-out targets (personalize) 10)",
                  "absent": 0.0},  # records from before the field: off
    )
    bank_prior_captions: str = field(
        default="", metadata={"help": "the bank prior's captions: 'toy', 'generic' or a file; empty: caption_bank"})
    n_bank_images: int = field(default=64, metadata={"help": "images the bank prior draws, spread over its captions"})
    bank_prior_unconditional: float | None = field(default=None, metadata={
        "help": "the share of the bank prior's images taken under the empty prompt (drawn per image), so that the "
                "unconditional prediction classifier-free guidance extrapolates from stays the original's (0: none; "
                "default 0, with held-out targets (personalize) 1)",
        "absent": 0.0})
    bank_prior_target: Literal["noise", "original"] = field(
        default="original",
        metadata={"help": "what the bank prior pulls the released model's prediction on its noised images toward: "
                          "the drawn noise (a denoising loss), or 'original': the prediction of the model as the "
                          "immunization found it, under the same noise (distillation: the same in expectation, "
                          "without the drawn noise's variance; on the toy, weight 5 kept as much drawn as the "
                          "denoising weight 3 at nearly twice its protection)",
                  "absent": "noise"},  # records from before the field: the denoising loss
    )
    retain_weight: float | None = field(
        default=None,
        metadata={"help": "weight of the retain term: class images after a simulated attack (0: off; default 3, with "
                          "held-out targets (personalize) 6)"},
    )
    retain_prompt: Literal["class", "attacker"] = field(
        default="attacker",
        metadata={"help": "what the retain term captions class images with: their class prompt, or 'attacker': "
                          "under an attacker that writes a token (fresh-token, textual-inversion, custom-diffusion), "
                          "the prompts it gives its concept's images (so the token stays learnable for others)",
                  "absent": "class"},
    )
    retain_target: Literal["noise", "original"] = field(
        default="noise",
        metadata={"help": "what the retain term's attacked model is pulled toward on its noised images: the drawn "
                          "noise, or 'original': the original model's prediction under the images' own prompts "
                          "(the class prompt; a distillation, as the bank prior's: the same in expectation where the "
                          "original model draws those images, without the drawn noise's variance)",
                  "absent": "noise"},
    )
    retain_order: Literal["attacker", "first-order"] = field(
        default="attacker",
        metadata={"help": "whether the retain term's gradient goes through its simulated attack as the attacker's "
                          "order says ('attacker'), or not ('first-order': one forward and backward fewer per class "
                          "batch; on the demo its gradient's cosine with the second order's fell from 0.98-0.999 "
                          "over the first 40 outer steps to a median 0.86, at worst -0.45, over the last 20)"},
    )
    retain_lr_scale: float = field(
        default=1.0,
        metadata={"help": "the retain term's simulated attack steps at this multiple of the attacker's rate, which "
                          "weighs more the part of its gradient that goes through the attack (at 3 the toy study "
                          "found the non-target no more learnable under a new word)"},
    )
    retain_attackers: tuple[dict | str, ...] | None = field(
        default=None,
        metadata={"help": "the retain term's own simulated attackers, entries as in `attackers`, one sampled per "
                          "outer step (by weight, apart from the ascent's), e.g. a many-step textual-inversion in "
                          "first order so that known concepts stay learnable by a new word; empty: the step's "
                          "attacker; default: empty, with held-out targets (personalize) one Adam step of "
                          "textual-inversion from its start, in first order",
                  "absent": ()},
    )
    retain_concepts: tuple[str, ...] = field(
        default=(),
        metadata={"help": "concepts (as --concepts takes them: toy:NAME, a concept file) whose images the retain term "
                          "takes instead of class images, under their own prompts or (retain_prompt 'attacker') "
                          "the attacker's token for their name: concepts to keep learnable, none of the targets"},
    )
    anchor_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the anchor term: under the target prompts the released model still denoises "
                          "class images (also where a concept's erase_to names another prompt), so erased targets "
                          "stay erased (0: off)"},
    )
    class_batches: Literal["per-concept", "per-class"] = field(
        default="per-concept",
        metadata={"help": "class-image batches of the prior and retain terms at each outer step: one per concept, or "
                          "one per class (concepts of one class prompt and class-image folder draw from one pool): "
                          "N times cheaper per step for N concepts of one class, but measured to protect less (demo "
                          "MSGR 20.5 / 13.2 against 23.6 / 16.4, two seeds, three attacks each), and as much only "
                          "with 70 steps, which take as long as 40 per concept"},
    )
    ridge: float = field(default=1e-3, metadata={"help": "Merge ridge toward W_0 (regularises M)"})
    caption_bank: str = field(
        default="auto",
        metadata={"help": "'toy', 'generic', a file, or 'auto': 'toy' for a model whose tokenizer knows the toy "
                          "world's words and not general English (the toy model and models made from it), else "
                          "'generic'"},
    )
    batch_size: int = field(default=4, metadata={"help": "images per concept per batch"})
    n_images: int = field(default=32, metadata={"help": "images generated per toy concept"})
    n_class_images: int = field(default=32, metadata={"help": "class images generated per class prompt"})
    erase_preserve_weight: float = field(default=1.0, metadata={"help": "erase: weight of the preserved prompts"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm of the upper step (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed of data, noise and timesteps"})
    save_every: int = field(default=25, metadata={"help": "checkpoint period in outer steps"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute UNet activations in the backward instead of keeping them: less memory, about a third more "
                "time"})
    concept_by_concept: bool = field(default=True, metadata={
        "help": "compute the meta-gradient one concept at a time: memory flat in the number of concepts, about "
                "1.3-1.5x the time of keeping every concept's graph at once (off)"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "autocast precision, float32 weights (fp16 is refused: use bf16)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_ranges()
        self.attacker_specs()  # each a valid AttackerSpec
        if any(spec.upper_skip for spec in self.retain_attacker_specs()):
            raise ConfigError("upper_skip is for the ascent's attackers (`attackers`), not retain_attackers")
        for entry in self.upper_lr_scales:
            parse_rate_scale(entry)
        for name, (weight, what) in FOR_A_TERM.items():
            if getattr(self, name) and getattr(self, weight) == 0:
                raise ConfigError(f"{name} {what}; give {weight} > 0")

    def _check_ranges(self) -> None:
        positive = ("inner_steps", "batch_size", "n_images", "n_class_images", "n_bank_images", "save_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.outer_lr <= 0 or self.inner_lr <= 0 or self.ridge <= 0 or self.retain_lr_scale <= 0:
            raise ConfigError("outer_lr, inner_lr, ridge and retain_lr_scale must be positive")
        zero_means = {"steps": "by the number of targets"} | dict.fromkeys((
            "inner_clip", "grad_clip", "upper_cap", "upper_contrast", "upper_focus", "kept_gradients", "fused_batches",
            "prior_weight", "bank_prior_weight", "retain_weight", "anchor_weight", "erase_preserve_weight"), "off")
        for name, zero in zero_means.items():
            if (getattr(self, name) or 0) < 0:  # None: the setting's default
                raise ConfigError(f"{name} must be >= 0 (0: {zero}), got {getattr(self, name)}")
        if not 0 <= self.upper_saliency < 1:
            raise ConfigError(f"upper_saliency is a share in [0, 1) (0: all of S^u), got {self.upper_saliency}")
        if self.upper_saliency_against == "class" and not (self.upper_saliency and self.uses_class_images):
            raise ConfigError("upper_saliency_against 'class' needs upper_saliency > 0 and class images")
        if not 0 <= (self.bank_prior_unconditional or 0) <= 1:
            raise ConfigError(f"bank_prior_unconditional is a share in [0, 1], got {self.bank_prior_unconditional}")

    def attacker_specs(self) -> list[AttackerSpec]:
        """The simulated attackers: `attackers`, or the one `full` attacker the inner_* fields describe; the steps,
        clip and order an entry leaves out taken from the run (inner_steps, inner_clip, order: never `inherit`)."""
        return self._specs(self.attackers or ({"lr": self.inner_lr},))

    def retain_attacker_specs(self) -> list[AttackerSpec]:
        """The retain term's own simulated attackers (`retain_attackers`, completed as `attacker_specs`)."""
        return self._specs(self.resolved("retain_attackers"))

    def _specs(self, entries: Sequence[object]) -> list[AttackerSpec]:
        return AttackerSpec.completed(entries, steps=self.inner_steps, clip=self.inner_clip, order=self.order)

    def check_names(self) -> None:
        """Resolve what the settings name (the method, a caption-bank file), so that a misspelling fails before any
        model loads; every run and `mima validate` call it."""
        from mima.data.captions import load_caption_bank
        from mima.immunize import immunizers
        from mima.immunize.attackers import simulated_attackers

        immunizers.get(self.method)
        for spec in [*self.attacker_specs(), *self.retain_attacker_specs()]:
            simulated_attackers.get(spec.kind).check_spec(spec)
        for bank in (self.caption_bank, self.bank_prior_captions):
            if bank not in ("auto", ""):
                load_caption_bank(bank)

    def check_concepts(self, specs: Sequence[ConceptSpec]) -> None:
        """Every concept has what the simulated attackers' prompts need (descriptions for `description`), and their
        `tokens` are rare words (none of a concept's words, nor of the caption bank's when it is named): fail before
        any model loads."""
        from mima.attacks.prompts import check_rare_token

        bank = self.caption_bank if self.caption_bank != "auto" else None
        for attacker in [*self.attacker_specs(), *self.retain_attacker_specs()]:
            for spec in specs:
                for token in attacker.tokens:
                    check_rare_token(token, spec, [], bank, where=f"simulated attacker '{attacker.kind}''s tokens")
                if attacker.prompt == DESCRIPTION_PROMPT and not spec.descriptions:
                    raise ConfigError(f"simulated attacker '{attacker.kind}' has prompt '{DESCRIPTION_PROMPT}' but "
                                      f"concept '{spec.name}' has no descriptions; give it `descriptions:` in the "
                                      f"concepts YAML")

    def retained_specs(self, targets: Sequence[ConceptSpec]) -> list[ConceptSpec]:
        """The concepts `retain_concepts` names (ConfigError for one that is also a target)."""
        from mima.data.concepts import load_concepts_arg

        specs = [spec for entry in self.retain_concepts for spec in load_concepts_arg(entry)]
        both = sorted({spec.name for spec in specs} & {spec.name for spec in targets})
        if both:
            raise ConfigError(f"retain_concepts must not name a target: {', '.join(both)}")
        return specs

    def differences(self, recorded: Mapping[str, object], fields: Sequence[str] | None = None) -> dict[str, tuple]:
        """[`Config.differences`], with each simulated attacker's unset learning rate and prompt read as its kind's
        defaults on both sides (`with_attacker_defaults`): a record that left them out, or was written before the
        field existed, reads as what ran."""
        given = {name: tuple(recorded[name]) for name in ("attackers", "retain_attackers") if recorded.get(name)}
        if given:
            resolved = ImmunizeConfig(**given).with_attacker_defaults()
            recorded = {**recorded, **{name: list(getattr(resolved, name)) for name in given}}
        return Config.differences(self.with_attacker_defaults(), recorded, fields)

    def for_model(self, model: str) -> ImmunizeConfig:
        """These settings as a run on `model` uses them: the setting's defaults where unset (`for_setting`);
        `caption_bank: auto` becomes the built-in bank written in the model's vocabulary, `toy` for a tokenizer that
        knows the toy world's words and not general English (the embedded model and every model made from it),
        `generic` for any other; attackers get their default learning rates (`with_attacker_defaults`)."""
        config = self.for_setting()
        if config.caption_bank == "auto":
            from mima.models.components import speaks_toy_vocabulary  # imports torch: keep this module light

            config = config.with_overrides(caption_bank="toy" if speaks_toy_vocabulary(model) else "generic")
        return config.with_attacker_defaults()

    def for_setting(self) -> ImmunizeConfig:
        """These settings with each one left unset (None) as a run takes it (`resolved`), so that the record says
        what ran."""
        return self.with_overrides(**{name: self.resolved(name) for name in SETTING_DEFAULTS[self.setting]})

    def resolved(self, name: str) -> object:
        """Field `name` as a run takes it: where unset (None), the setting's default (`SETTING_DEFAULTS`), or for a
        setting of a term that is off, the relearn setting's (nothing of the term)."""
        if (value := getattr(self, name)) is not None:
            return value
        term = FOR_A_TERM.get(name)
        off = term is not None and self.resolved(term[0]) == 0
        return SETTING_DEFAULTS["relearn" if off else self.setting][name]

    def for_targets(self, count: int) -> ImmunizeConfig:
        """These settings for `count` targets: `steps: 0` becomes OUTER_STEPS, plus OUTER_STEPS_PER_EXTRA_TARGET per
        target past three, so that the record says what ran."""
        extra = OUTER_STEPS_PER_EXTRA_TARGET * max(0, count - 3)
        return self if self.steps else self.with_overrides(steps=OUTER_STEPS + extra)

    def with_attacker_defaults(self) -> ImmunizeConfig:
        """These settings with each simulated attacker's unset learning rate and prompt set to its kind's defaults,
        so that the record says what ran."""
        from mima.immunize.attackers import simulated_attackers  # imports torch: keep this module light

        def resolved(entries: tuple, specs: list[AttackerSpec]) -> tuple:
            kinds = [simulated_attackers.get(spec.kind) for spec in specs]
            return tuple({**attacker_mapping(given), "lr": kind.default_lr if spec.lr is None else spec.lr,
                          "prompt": spec.prompt or kind.default_prompt}
                         for given, spec, kind in zip(entries, specs, kinds, strict=True))

        return self.with_overrides(  # () stays (): one `full` attacker / the step's attacker
            attackers=resolved(self.attackers, self.attacker_specs()) if self.attackers else None,
            retain_attackers=None if self.retain_attackers is None  # None stays: the setting's
            else resolved(self.retain_attackers, self.retain_attacker_specs()))

    def upper_rate_scales(self, upper_names: Sequence[str]) -> dict[str, float]:
        """Each S^u parameter's multiple of outer_lr (`upper_lr_scales`; see `rate_scales`)."""
        return rate_scales(self.upper_lr_scales, upper_names)

    @property
    def uses_class_images(self) -> bool:
        """Whether the objective needs class images (prior-preservation, retain or anchor term, contrast)."""
        return (self.prior_weight > 0 or self.resolved("retain_weight") > 0 or self.anchor_weight > 0
                or self.upper_contrast > 0)

    @property
    def uses_teacher(self) -> bool:
        """Whether a term of the outer loop distils from the model as the immunization found it: the bank prior or
        the retain term with target 'original'."""
        from mima.immunize import immunizers

        iterative = immunizers.get(self.method).iterative
        retain = self.resolved("retain_weight") > 0 and self.retain_target == "original" and iterative
        return (self.uses_bank_prior and self.bank_prior_target == "original") or retain

    @property
    def uses_bank_prior(self) -> bool:
        """Whether the run needs the bank prior's images: its term is on and the method iterates (`erase` and
        `none` do all their work before the outer loop)."""
        from mima.immunize import immunizers

        return self.resolved("bank_prior_weight") > 0 and immunizers.get(self.method).iterative

