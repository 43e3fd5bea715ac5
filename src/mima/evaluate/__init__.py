"""Evaluation of immunization: image encoders, metrics (S, SGR, MSGR, MRSGR) and the evaluation of attack runs.

The registries live in their modules, `mima.evaluate.encoders.encoders` and `mima.evaluate.metrics.metrics`; they are
not re-exported here, where their names would hide the submodules of the same names.
"""

from mima.evaluate.encoders import ImageEncoder, get_encoder
from mima.evaluate.evaluate import evaluate_runs, pair_runs, resolve_references, write_evaluation
from mima.evaluate.metrics import Metric, SimilarityCurve, mrsgr, msgr, sgr, similarity
from mima.evaluate.results import ConceptResult, EncoderResult, Evaluation, read_evaluation

__all__ = [
    "ConceptResult",
    "EncoderResult",
    "Evaluation",
    "ImageEncoder",
    "Metric",
    "SimilarityCurve",
    "evaluate_runs",
    "get_encoder",
    "mrsgr",
    "msgr",
    "pair_runs",
    "read_evaluation",
    "resolve_references",
    "sgr",
    "similarity",
    "write_evaluation",
]
