"""How well a model draws the toy world: the toy judge's recognition rate of each concept in its samples."""

from __future__ import annotations

from mima.models.components import Components
from mima.sampling import DEFAULT_GUIDANCE, DEFAULT_SAMPLING_STEPS, sample_images
from mima.toy import world as toy_world
from mima.toy.judge import ToyJudge

# Compositions probed: every pretraining object with two pretraining styles (deterministic choice).
_COMPOSITION_STYLES = 2


def concept_rates(
    components: Components, judge: ToyJudge, *, n: int = 32, seed: int = 0,
    steps: int = DEFAULT_SAMPLING_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
) -> dict[str, dict[str, float]]:
    """Judge rates by concept: `{"styles": {...}, "objects": {...}, "held_out": {...}, "compositions": {...}}`.

    A concept's rate is the share of `n` samples of its first prompt that the judge assigns to it; a composition
    "a <object> in <style> style" counts when both heads agree with it.
    """
    rates: dict[str, dict[str, float]] = {"styles": {}, "objects": {}, "held_out": {}, "compositions": {}}
    for concept in toy_world.toy_concepts():
        images = sample_images(components, [concept.prompts[0]] * n, seed=seed, steps=steps,
                               guidance_scale=guidance_scale)
        group = "held_out" if concept.held_out else f"{concept.family}s"
        rates[group][concept.name] = judge.concept_rate(images, concept.name)
    styles = [s for s in toy_world.STYLES if s not in toy_world.HELD_OUT]
    objects = [o for o in toy_world.OBJECTS if o not in toy_world.HELD_OUT]
    for i, obj in enumerate(objects):
        for style in (styles[(i + k) % len(styles)] for k in range(_COMPOSITION_STYLES)):
            prompt = toy_world.COMPOSITION_TEMPLATE.format(obj, style)
            images = sample_images(components, [prompt] * n, seed=seed, steps=steps, guidance_scale=guidance_scale)
            predicted_styles, predicted_objects = judge.predict(images)
            hits = sum(s == style and o == obj for s, o in zip(predicted_styles, predicted_objects, strict=True))
            rates["compositions"][f"{obj}/{style}"] = hits / n
    return rates


def summarize(rates: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and minimum rate per group."""
    return {group: {"mean": sum(v.values()) / len(v), "min": min(v.values())} for group, v in rates.items() if v}
