"""torch.distributed communicator, for ``torchrun`` jobs and any process whose default process group is initialised.

It reuses the user's default process group (``dist.is_initialized()``), so it never starts a second rendezvous. Under
``torchrun`` without one it initialises the default group itself from torchrun's environment (``env://``): Gloo for
CPU tensors, plus NCCL for CUDA tensors when CUDA is available (``"cpu:gloo,cuda:nccl"``), the backends PyTorch's own
DDP would pick.

Buffers: the torch averaged state hands its flat tensors as ``native`` and they are reduced in place, on their own
device (NCCL for CUDA, Gloo for CPU). Small numpy arrays (metrics, fingerprints, the layout digest) are wrapped with
``torch.from_numpy`` (zero-copy) and moved through Gloo, or staged on the current CUDA device when the group has only
NCCL. float16 and bfloat16 are reduced in float32 (one upcast, one rounding back, the same code on every rank), as the
mpi4py communicator does; broadcasts and allgathers move bits unchanged.

Every collective runs under the watchdog (``watchdog.py``); a CUDA collective is waited for (stream synchronised)
inside the deadline's bracket, because NCCL returns before the data moved. Past the deadline the stuck rank prints where
every rank is and leaves with ``os._exit``: torchrun's agent then stops the other workers.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from typing import Any, List, Optional

import numpy as np

from .base import CommError, ReduceOp, barrier_by_allreduce, check_rank
from .watchdog import Watchdog, get_timeout

#: Environment torchrun (torch.distributed.elastic) sets for each worker.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_world_size() -> Optional[int]:
    """The world size torchrun (or any ``env://`` launcher) declares, or None when these variables are not set."""
    if not all(k in os.environ for k in TORCHRUN_ENV):
        return None
    text = os.environ["WORLD_SIZE"].strip()
    return int(text) if text.isdigit() else None


class TorchDistComm:
    name = "torch"

    def __init__(self) -> None:
        try:
            import torch  # noqa: WPS433 -- lazy: torch is optional
            import torch.distributed as dist  # noqa: WPS433
        except ImportError as exc:
            raise CommError("ITERAVG_COMM=torch needs PyTorch with torch.distributed (pip install torch)") from exc
        if not dist.is_available():
            raise CommError("this PyTorch build has no torch.distributed; use ITERAVG_COMM=mpi or horovod")
        self._torch, self._dist = torch, dist
        self.initialised_here = False
        if not dist.is_initialized():
            if torchrun_world_size() is None:
                raise CommError(
                    "ITERAVG_COMM=torch: no default process group is initialised and this process was not started by "
                    f"torchrun ({', '.join(TORCHRUN_ENV)} unset): call torch.distributed.init_process_group() first, "
                    "or launch with torchrun")
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            deadline = get_timeout()  # the rendezvous waits for absent peers no longer than a collective would
            try:
                if deadline is None:
                    dist.init_process_group(backend=backend)
                else:
                    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=deadline))
            except Exception as exc:  # noqa: BLE001 -- any rendezvous failure is a CommError naming the launcher
                raise CommError(f"torch.distributed.init_process_group(backend={backend!r}) failed under torchrun: "
                                f"{exc}") from exc
            self.initialised_here = True
            # A group left alive at interpreter exit can abort the process in its store's teardown ("terminate
            # called without an active exception" on rank 0, which hosts the store): the creator tears it down.
            atexit.register(self.shutdown)
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self.backend = str(dist.get_backend())
        self._gloo = "gloo" in self.backend
        self._ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                     "max": dist.ReduceOp.MAX}
        self._shut = False
        self.watchdog = None
        if self.size > 1:
            self.watchdog = Watchdog(self.rank, self.size, "torch", self._abort,
                                     "os._exit; torchrun stops the other workers")
            self.watchdog.connect(self._allgather_bytes)

    # -- plumbing ----------------------------------------------------------------------------------
    @staticmethod
    def _abort(code: int) -> None:
        sys.stderr.flush()
        os._exit(code)

    def _staging_device(self) -> Any:
        """Where host arrays go for a collective: the CPU with Gloo, else the current CUDA device (NCCL only)."""
        if self._gloo:
            return self._torch.device("cpu")
        return self._torch.device("cuda", self._torch.cuda.current_device())

    def _tensor(self, array: Optional[np.ndarray], native: Any) -> Any:
        """The tensor a collective works on: ``native`` if it is a torch tensor this group can move, else the numpy
        array wrapped without a copy (or staged on the GPU for an NCCL-only group)."""
        torch = self._torch
        if isinstance(native, torch.Tensor) and (native.device.type != "cpu" or self._gloo):
            return native
        if array is None:
            if isinstance(native, torch.Tensor):
                return native
            raise CommError("torch communicator: a collective got neither a numpy array nor a torch tensor")
        host = torch.from_numpy(np.ascontiguousarray(array))
        device = self._staging_device()
        return host if device.type == "cpu" else host.to(device)

    def _finish(self, tensor: Any, array: Optional[np.ndarray]) -> None:
        """Wait for the collective (CUDA streams run ahead of the host) and copy a staged result back."""
        if tensor.device.type == "cuda":
            self._torch.cuda.current_stream(tensor.device).synchronize()
        if array is not None and (tensor.device.type != "cpu" or tensor.data_ptr() != array.ctypes.data):
            np.copyto(array, tensor.cpu().numpy().reshape(array.shape))

    def _bracket(self, name: str) -> Any:
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        return wd

    def _allgather_bytes(self, row: bytes) -> List[bytes]:
        t = self._tensor(np.frombuffer(row, dtype=np.uint8).copy(), None)
        out = self._torch.empty(self.size * t.numel(), dtype=t.dtype, device=t.device)
        self._dist.all_gather_into_tensor(out, t)
        data = out.cpu().numpy().reshape(self.size, -1)
        return [bytes(r) for r in data]

    # -- the protocol ------------------------------------------------------------------------------
    def allreduce_(self, array: Optional[np.ndarray], *, op: ReduceOp, name: str, native: Any = None) -> None:
        if op not in self._ops:
            raise ValueError(f"op must be sum, mean, min or max, got {op!r}")
        torch = self._torch
        t = self._tensor(array, native)
        wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        wd = self._bracket(name)
        try:
            self._dist.all_reduce(wide, op=self._ops[op])
            if op == "mean" and self.size > 1:
                wide.mul_(1.0 / self.size)
            if wide is not t:
                t.copy_(wide)
            self._finish(t, array)
        finally:
            if wd is not None:
                wd.end()

    def broadcast_(self, array: Optional[np.ndarray], *, root: int, name: str, native: Any = None) -> None:
        check_rank(root, self.size)
        t = self._tensor(array, native)
        wd = self._bracket(name)
        try:
            self._dist.broadcast(t, src=root)
            self._finish(t, array)
        finally:
            if wd is not None:
                wd.end()

    def allgather(self, row: np.ndarray, *, name: str) -> np.ndarray:
        row = np.ascontiguousarray(row).reshape(-1)
        raw = row.view(np.uint8) if row.size else np.zeros(0, dtype=np.uint8)
        t = self._tensor(raw.copy(), None)  # bytes: any dtype moves bit for bit
        out = self._torch.empty(self.size * t.numel(), dtype=t.dtype, device=t.device)
        wd = self._bracket(name)
        try:
            self._dist.all_gather_into_tensor(out, t)
            self._finish(out, None)
        finally:
            if wd is not None:
                wd.end()
        return out.cpu().numpy().view(row.dtype).reshape(self.size, -1)

    def allgather_tensor(self, tensor: Any, *, name: str) -> Any:
        """Stack every rank's 1-D ``tensor`` (same length, dtype and device on all ranks) into one ``(size * len,)``
        tensor on its device: the gather of sharded averaged state, without a trip through the host."""
        out = self._torch.empty(self.size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        wd = self._bracket(name)
        try:
            self._dist.all_gather_into_tensor(out, tensor.contiguous())
            self._finish(out, None)
        finally:
            if wd is not None:
                wd.end()
        return out

    def barrier(self, *, name: str) -> None:
        barrier_by_allreduce(self, name)

    def shutdown(self) -> None:
        """Stop the watchdog; the process group is destroyed only if iteravg created it (the user's stays theirs)."""
        if self._shut:
            return
        self._shut = True
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.initialised_here and self._dist.is_initialized():
            self._dist.destroy_process_group()
