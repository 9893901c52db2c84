"""A cost model of the training step that predicts which compressor and strategy win.

:mod:`.model` holds the alpha-beta-gamma algebra of the collectives and strategies,
:mod:`.layout` lays a model's gradients out as the optimizer sends them, :mod:`.calibrate`
measures the link and the compressors, :mod:`.choose` compares the options;
``python -m gradzip.plan`` prints them as a table.
"""

from gradzip.plan.choose import DEFAULT_METHODS, Option, best, predict
from gradzip.plan.layout import Tensor, buckets, from_module
from gradzip.plan.model import Bucket, Link, Rates, StepCost, step_cost, strategy_cost

__all__ = [
    "DEFAULT_METHODS",
    "Bucket",
    "Link",
    "Option",
    "Rates",
    "StepCost",
    "Tensor",
    "best",
    "buckets",
    "from_module",
    "predict",
    "step_cost",
    "strategy_cost",
]
