"""Gradient averaging across ranks for the ``mx.gluon.Trainer`` GluonTS builds, in one collective per step.

Why one flat buffer: GluonTS networks have 40-200 small tensors; one allreduce of all gradients (plus two control
slots) costs one network round trip instead of one per tensor, on Horovod and mpi4py alike, and goes through
``iteravg.collectives`` like every other collective.

Control slots (at the end of the first dtype group's buffer, averaged with the gradients):

* ``contributes`` -- 1 if this rank's gradients are real. GluonTS skips a batch whose loss is NaN/inf on the rank
  that saw it (no ``step``); that rank then joins the pending allreduce with zero gradients and 0 here (a *null
  step*), so the other ranks never wait for it. The mean is rescaled to the mean over contributing ranks, every
  rank applies the same update (the skipping rank too, so the replicas stay identical); if no rank contributed,
  nobody updates, as GluonTS on one process.
* ``ended`` -- 1 if this rank's training-batch iterator ended. If some ranks ended and others did not, every rank
  raises the same error instead of waiting forever.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from .. import collectives
from ..comm import Communicator
from ..mx.ndarray import DefaultLayout, flat_allocator, numpy_view

CONTROL_SLOTS = 2


class DataExhaustedError(collectives.CollectiveError):
    """The training-batch iterator ended on some ranks but not on others."""


class GradientReducer:
    """Averages the gradients of ``params`` across ``comm``'s ranks in place (see the module doc)."""

    def __init__(self, comm: Communicator, params: Sequence[Any]) -> None:
        self.comm = comm
        self.params = [p for p in params if p.grad_req != "null"]
        self.grads = [p.list_grad()[0] for p in self.params]
        for p, g in zip(self.params, self.grads):
            if g.context.device_type not in ("cpu", "cpu_pinned", "cpu_shared") or g.stype != "default":
                raise ValueError(f"iteravg.gluonts.Trainer reduces dense CPU gradients; parameter {p.name!r} has a "
                                 f"{g.stype} gradient on {g.context}. Train on ctx=mx.cpu() when running distributed.")
        dtypes: List[np.dtype] = []
        for g in self.grads:
            if np.dtype(g.dtype) not in dtypes:
                dtypes.append(np.dtype(g.dtype))
        self.groups: List[List[int]] = [[i for i, g in enumerate(self.grads) if np.dtype(g.dtype) == dt]
                                        for dt in dtypes]
        self.flat: List[np.ndarray] = []
        self.native: List[Any] = []
        for k, members in enumerate(self.groups):
            n = sum(int(np.prod(self.grads[i].shape, dtype=np.int64)) for i in members)
            view, nd = flat_allocator(n + (CONTROL_SLOTS if k == 0 else 0), dtypes[k])
            self.flat.append(view)
            self.native.append(nd)
        self._layout = DefaultLayout(self.grads)
        self._views: Optional[List[np.ndarray]] = None

    def _grad_views(self) -> List[np.ndarray]:
        mx.nd.waitall()  # backward (and the previous update) must be done before numpy touches the memory
        if self._layout.refresh() or self._views is None:  # oneDNN may have reordered a gradient in place
            self._layout.adopt()
            self._views = [numpy_view(g).reshape(-1) for g in self.grads]
        return self._views

    def reduce(self, contributes: bool, ended: bool = False) -> Tuple[int, int]:
        """Replace every rank's gradients by the mean over contributing ranks (collective).

        Returns (number of contributing ranks, number of ranks whose iterator ended), identical on every rank.
        """
        views = self._grad_views()
        for k, members in enumerate(self.groups):
            flat = self.flat[k]
            body = flat[: flat.size - (CONTROL_SLOTS if k == 0 else 0)]
            if contributes:
                np.concatenate([views[i] for i in members], out=body)
            else:
                body[:] = 0
        ctrl = self.flat[0][-CONTROL_SLOTS:]
        ctrl[0] = 1 if contributes else 0
        ctrl[1] = 1 if ended else 0
        collectives.allreduce_mean_arrays(self.comm, self.flat, self.native, name="iteravg.grad")
        size = self.comm.size
        contributors = int(round(float(ctrl[0]) * size))
        ended_ranks = int(round(float(ctrl[1]) * size))
        if 0 < contributors < size:
            for flat in self.flat:
                np.multiply(flat, flat.dtype.type(size / contributors), out=flat)
        for k, members in enumerate(self.groups):
            off = 0
            for i in members:
                n = views[i].size
                np.copyto(views[i], self.flat[k][off : off + n])
                off += n
        return contributors, ended_ranks

    def mark_fresh(self) -> None:
        """After a null step the gradients hold the other ranks' mean: let ``Trainer._update`` use them."""
        for p in self.params:
            for arr in p.list_data():
                arr._fresh_grad = True  # noqa: SLF001 -- MXNet's flag, set by backward() on the other ranks
