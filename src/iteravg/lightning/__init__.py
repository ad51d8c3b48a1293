"""``iteravg.lightning``: GluonTS's iteration averaging (NT-ASGD, suffix, polynomial-decay, EMA) as a Lightning
callback, distributed under DDP and FSDP2.

A thin translation of Lightning's hooks onto ``iteravg.torch.Averager`` (as ``iteravg.mx.callback`` translates GluonTS's
MXNet hooks)::

    import iteravg, lightning
    from iteravg.lightning import IterationAveraging, RankSeeding

    cb = IterationAveraging(iteravg.NTASchedule(epochs=50, n=5), monitor="val_loss")
    trainer = lightning.Trainer(max_epochs=50, callbacks=[cb], strategy="ddp", devices=2, accelerator="cpu")

``RankSeeding`` gives each rank its own random stream, so GluonTS's training loaders draw different windows on
different ranks (see ``docs/lightning.md``).
"""

from __future__ import annotations

try:
    import lightning.pytorch  # noqa: F401 -- the callbacks subclass lightning.pytorch.Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("iteravg.lightning needs Lightning 2.x (pip install 'lightning>=2.4'); "
                      "requirements/lightning.txt pins the tested version") from exc

from .callback import IterationAveraging
from .seeding import RankSeeding

__all__ = ["IterationAveraging", "RankSeeding"]
