"""iteravg: distributed model-iteration averaging (Polyak / NT-ASGD / suffix averaging / EMA).

``iteravg.Averager`` is the framework-neutral engine: give it numpy views of any framework's parameters. It
imports numpy only -- no MXNet, Horovod or MPI until a launcher asks for one. Framework faces are thin:
``iteravg.mx`` is GluonTS's API for MXNet Gluon, ``iteravg.gluonts`` GluonTS's Trainer made data-parallel.
"""

__version__ = "0.2.0"

from .comm import get_comm  # noqa: E402
from .core.averaged import AveragedState, Layout, TensorSpec  # noqa: E402
from .core.engine import Averager, ArraySource, ParamSource  # noqa: E402
from .core.schedules import AlphaSuffixSchedule, EMASchedule, EveryNSteps, NTASchedule, Schedule  # noqa: E402

__all__ = [
    "__version__",
    "Averager",
    "ArraySource",
    "ParamSource",
    "Schedule",
    "NTASchedule",
    "AlphaSuffixSchedule",
    "EMASchedule",
    "EveryNSteps",
    "AveragedState",
    "Layout",
    "TensorSpec",
    "get_comm",
]
