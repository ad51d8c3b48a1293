"""iteravg: distributed model-iteration averaging (Polyak / NT-ASGD / suffix averaging).

The framework-neutral core (``iteravg.core``, ``iteravg.comm``, ``iteravg.collectives``,
``iteravg.checkpoint``) imports only numpy. Framework bindings import their framework lazily:
``iteravg.mx`` is GluonTS's API for MXNet Gluon.
"""

__version__ = "0.1.0"

from .core.averaged import AveragedState, Layout, TensorSpec  # noqa: E402
from .core.schedules import AlphaSuffixSchedule, NTASchedule, Schedule  # noqa: E402

__all__ = ["__version__", "Schedule", "NTASchedule", "AlphaSuffixSchedule", "AveragedState", "Layout", "TensorSpec"]
