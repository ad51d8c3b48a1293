"""Detect independent replicas: a multi-rank run whose networks were never kept in sync.

Why: GluonTS's own ``Trainer`` knows nothing about ``horovodrun`` / ``mpirun``. Launched on N ranks it trains N
unrelated networks (no initial broadcast, no gradient reduction), exits 0 and, with iteravg's callback, "averages"
unrelated models. Data-parallel training (``iteravg.gluonts.Trainer``, iteravg's own training loop, Horovod's
``DistributedTrainer``) keeps the *trainable* parameters bitwise identical on every rank after every step, so one
cheap fingerprint comparison tells the two apart.

``check_replicas_in_sync`` is a collective: every rank calls it at the same point (iteravg's
``ModelIterationAveraging`` calls it once, at the first ``on_epoch_end``), and every rank gets the same answer.
Called from GluonTS's own ``Trainer`` loop on several ranks it raises at once, fingerprints or not: that loop
never reduces gradients, so even identical replicas (same seed everywhere) are N times the compute for nothing.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Any, List, Optional

import numpy as np

from .. import collectives
from ..comm import Communicator

__all__ = [
    "IndependentReplicasError",
    "check_replicas_in_sync",
    "called_from_plain_gluonts_trainer",
    "fingerprints_agree",
    "parameter_fingerprint",
]
logger = logging.getLogger("iteravg")

ADVICE = (
    "Use `from iteravg.gluonts import Trainer` (same arguments as GluonTS's Trainer): it broadcasts the initial "
    "parameters, averages gradients every step and reduces epoch losses across ranks."
)


class IndependentReplicasError(collectives.CollectiveError):
    """Raised on every rank when the ranks train independent replicas (no gradient reduction)."""


def parameter_fingerprint(net: Any, trainable_only: bool = True) -> bytes:
    """A 64-bit digest of the network's parameter bits, in ``collect_params()`` order.

    ``trainable_only`` leaves out ``grad_req == "null"`` arrays (BatchNorm running statistics), which data-parallel
    loops may legitimately keep per rank.
    """
    h = hashlib.blake2b(digest_size=8)
    for name, p in net.collect_params().items():
        if trainable_only and p.grad_req == "null":
            continue
        data = p.data().asnumpy()  # asnumpy: MXNet's default layout, whatever oneDNN did to the array
        h.update(name.encode())
        h.update(np.ascontiguousarray(data).view(np.uint8).tobytes())
    return h.digest()


def _chunks(digest: bytes) -> List[int]:
    return [int.from_bytes(digest[i : i + 2], "little") for i in range(0, len(digest), 2)]


def fingerprints_agree(comm: Communicator, digest: bytes) -> bool:
    """True on every rank iff every rank passed the same ``digest`` (collective; one small allgather).

    The digest is split into 16-bit integers; from the rank means of x and x^2 every rank recovers the exact
    integer sums S1, S2 and tests ``size * S2 == S1 ** 2``, which holds iff all ranks' x are equal.
    """
    if comm.size == 1:
        return True
    xs = _chunks(digest)
    means = collectives.mean_of_ranks(comm, [float(x) for x in xs] + [float(x * x) for x in xs])
    n = len(xs)
    for k in range(n):
        s1 = int(round(means[k] * comm.size))
        s2 = int(round(means[n + k] * comm.size))
        if comm.size * s2 != s1 * s1:
            return False
    return True


def called_from_plain_gluonts_trainer() -> bool:
    """True if the caller runs inside GluonTS's own ``Trainer.__call__`` (not ``iteravg.gluonts.Trainer``).

    Looks for GluonTS's training-loop frame on the stack (GluonTS is never imported here: if it is not loaded,
    the answer is False).
    """
    base = sys.modules.get("gluonts.mx.trainer._base")
    code = getattr(getattr(getattr(base, "Trainer", None), "__call__", None), "__code__", None)
    if code is None:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            owner = frame.f_locals.get("self")
            return not getattr(owner, "iteravg_data_parallel", False)
        frame = frame.f_back
    return False


def check_replicas_in_sync(comm: Communicator, net: Any, strict: Optional[bool] = True,
                           what: str = "at the first epoch end") -> bool:
    """Whether every rank holds the same trainable parameters (collective; True at once on one rank).

    ``strict=None`` (what ``ModelIterationAveraging`` uses): raise ``IndependentReplicasError`` at once when called
    from GluonTS's plain ``Trainer`` (the silent-replicas case this guard exists for: it never reduces gradients,
    whatever the fingerprints say); otherwise compare fingerprints and only warn if they differ (hand-written loops
    may average independently trained replicas on purpose, e.g. local SGD). ``strict=True`` raises and
    ``strict=False`` warns (rank 0) when the fingerprints differ.
    """
    if comm.size == 1:
        return True
    if strict is None and called_from_plain_gluonts_trainer():
        # Known without comparing: GluonTS's own Trainer never reduces gradients (identical replicas only mean
        # every rank used the same seed and data: N times the compute). Every rank takes this branch.
        raise IndependentReplicasError(
            f"iteravg: GluonTS's gluonts.mx.trainer.Trainer runs on {comm.size} ranks ({comm.name} rank "
            f"{comm.rank}/{comm.size}) and does not reduce gradients across them. {ADVICE}")
    if fingerprints_agree(comm, parameter_fingerprint(net, trainable_only=True)):
        return True
    msg = (f"iteravg: the {comm.size} ranks hold different trainable parameters {what} "
           f"({comm.name} rank {comm.rank}/{comm.size}): every rank trained its own network, so the average "
           "would average unrelated models.")
    if strict:
        raise IndependentReplicasError(f"{msg} {ADVICE}")
    if comm.rank == 0:
        logger.warning("%s If that is not what you want: %s", msg, ADVICE)
    return False
