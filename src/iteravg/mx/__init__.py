"""iteravg for MXNet Gluon: GluonTS's iteration-averaging API, distributed.

Drop-in for ``gluonts.mx.trainer.model_iteration_averaging``::

    from iteravg.mx import NTA, Alpha_Suffix, IterationAveragingStrategy, ModelIterationAveraging

plus ``EMA`` (an exponential moving average on the same interface; not in GluonTS).
"""

from .callback import ModelIterationAveraging
from .checkpoint import load_checkpoint, save_checkpoint
from .strategies import EMA, NTA, Alpha_Suffix, IterationAveragingStrategy

__all__ = [
    "IterationAveragingStrategy",
    "NTA",
    "Alpha_Suffix",
    "EMA",
    "ModelIterationAveraging",
    "save_checkpoint",
    "load_checkpoint",
]
