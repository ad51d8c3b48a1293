"""Distributed training loop for MXNet Gluon with GluonTS callback hooks (see ``loop``)."""

from .loop import FitResult, StoppedEarly, evaluate, finish_training, fit

__all__ = ["fit", "finish_training", "evaluate", "FitResult", "StoppedEarly"]
