"""The differentiable Merge layer: closed-form math and the precomputed plan that applies it to a UNet."""

from mima.merge.closed_form import FactorizedGram, closed_form_merge, factorize_gram, merged_values
from mima.merge.plan import MergePlan

__all__ = ["FactorizedGram", "MergePlan", "closed_form_merge", "factorize_gram", "merged_values"]
