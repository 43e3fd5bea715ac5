from __future__ import annotations

import numpy as np
import pytest

from mima.toy import world as toy_world

CONCEPTS = [c.name for c in toy_world.toy_concepts()]


def test_concepts_are_unique_with_held_out_ones_in_each_family():
    concepts = toy_world.toy_concepts()
    assert len(concepts) >= 20
    assert len(set(CONCEPTS)) == len(CONCEPTS)
    held_out = {c.name for c in concepts if c.held_out}
    assert held_out == toy_world.HELD_OUT
    assert {c.family for c in concepts if c.held_out} == {"style", "object"}


def test_same_seed_same_bytes_different_seed_different_images():
    images_a, prompts_a = toy_world.sample_concept_images("star", 4, seed=3)
    images_b, prompts_b = toy_world.sample_concept_images("star", 4, seed=3)
    images_c, _ = toy_world.sample_concept_images("star", 4, seed=4)
    assert np.stack(images_a).tobytes() == np.stack(images_b).tobytes()
    assert prompts_a == prompts_b
    assert np.stack(images_a).tobytes() != np.stack(images_c).tobytes()


@pytest.mark.parametrize("concept", CONCEPTS)
def test_every_concept_renders_with_prompts_naming_it(concept):
    images, prompts = toy_world.sample_concept_images(concept, 2, seed=0)
    for image in images:
        assert image.shape == (toy_world.RESOLUTION, toy_world.RESOLUTION, 3)
        assert image.dtype == np.uint8
        assert image.std() > 5, "a concept image should not be a flat colour"
    assert all(concept in prompt.split() for prompt in prompts)
    assert not np.array_equal(images[0], images[1])


def test_unknown_concept_raises_key_error():
    with pytest.raises(KeyError):
        toy_world.concept_family("unicorn")


def test_training_batches_leave_out_held_out_concepts_by_default():
    images, prompts, labels = toy_world.sample_training_batch(64, np.random.default_rng(0))
    assert images.shape == (64, toy_world.RESOLUTION, toy_world.RESOLUTION, 3)
    assert len(prompts) == len(labels) == 64
    seen = {name for label in labels for name in label if name}
    assert seen and not seen & toy_world.HELD_OUT
    assert any(style and obj for style, obj in labels), "compositions should appear"
