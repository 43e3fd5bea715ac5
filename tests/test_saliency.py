"""The saliency masks of `upper_saliency` against their defining property, on a loss whose gradient is known."""

import torch

from mima.immunize.saliency import SALIENCY_BATCHES, saliency_masks


class _Concept:
    """A stand-in for an EncodedConcept: its batch is the scale the loss multiplies by."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def batch(self, batch_size, generator):
        return self.scale


def test_each_tensor_keeps_its_share_of_the_largest_summed_gradients():
    """loss = sum(c * w) per batch: the summed gradient is c times the batches' scales, so the mask of each tensor
    is its entries of largest |c|, whatever the scale of another tensor."""
    large = torch.tensor([[4.0, -9.0, 1.0], [-2.0, 7.0, 0.5]])
    small = torch.tensor([1e-6, -3e-6, 2e-6, 0.0])
    tiny = torch.tensor([5.0])
    params = {name: torch.zeros_like(c, requires_grad=True) for name, c in
              (("large", large), ("small", small), ("tiny", tiny))}
    coefficients = {"large": large, "small": small, "tiny": tiny}
    calls = []

    def loss(scale, generator):
        calls.append(scale)
        return sum((coefficients[name] * p).sum() for name, p in params.items()) * scale

    masks = saliency_masks(params, loss, [_Concept(1.0), _Concept(-2.0)], share=0.5, batch_size=2, seed=0)
    assert calls == [1.0] * SALIENCY_BATCHES + [-2.0] * SALIENCY_BATCHES
    assert masks["large"].tolist() == [[True, True, False], [False, True, False]]  # |c| 9, 7, 4
    assert masks["small"].tolist() == [False, True, True, False]  # scale does not matter across tensors
    assert masks["tiny"].tolist() == [True]  # at least one entry
    assert all(m.dtype == torch.bool and m.shape == coefficients[n].shape for n, m in masks.items())


class _ClassBatch:
    """A batch with class images (`prior`), whose conditioning "class" tells the loss which images it is given."""

    latents, hidden = 1.0, None

    def __init__(self) -> None:
        self.prior = (0.0, "class")


class _ClassConcept:
    def batch(self, batch_size, generator):
        return _ClassBatch()


def test_against_class_ranks_by_the_targets_gradient_relative_to_the_class_images():
    """loss = sum(c_t * w) on the targets' images and sum(c_c * w) on their class images: entries the class needs as
    much as the targets rank below an entry only the targets need, even a larger one."""
    target = torch.tensor([8.0, 6.0, 3.0, 0.5])
    classes = torch.tensor([8.0, 0.0, 0.0, 4.0])  # mean |g_c| 3
    w = torch.zeros(4, requires_grad=True)

    def loss(batch, generator):
        return ((classes if batch.hidden == "class" else target) * w).sum()

    plain = saliency_masks({"w": w}, loss, [_ClassConcept()], share=0.5, batch_size=1, seed=0)
    relative = saliency_masks({"w": w}, loss, [_ClassConcept()], share=0.5, batch_size=1, seed=0, against_class=True)
    assert plain["w"].tolist() == [True, True, False, False]  # |g| 8, 6
    assert relative["w"].tolist() == [False, True, True, False]  # 8/11, 6/3, 3/3, 0.5/7


def test_against_class_ranks_a_tensor_the_class_does_not_reach_by_the_targets_gradient():
    w = torch.zeros(3, requires_grad=True)
    target = torch.tensor([1e30, 2e30, 3.0])  # large enough to overflow any division by a tiny stand-in for 0

    def loss(batch, generator):
        return (w * 0.0).sum() if batch.hidden == "class" else (target * w).sum()

    masks = saliency_masks({"w": w}, loss, [_ClassConcept()], share=0.34, batch_size=1, seed=0, against_class=True)
    assert masks["w"].tolist() == [False, True, False]
