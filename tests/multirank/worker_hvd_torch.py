"""A PyTorch model averaged by ``iteravg.Averager`` through numpy views of its CPU parameters
(``p.detach().numpy()``), under a launcher. Independent replicas: each rank trains on its own data from its own
initial weights, no gradient reduction, so only the averaging sync can make the ranks' averages agree.

usage: worker_hvd_torch.py OUT_DIR [--native]
``--native``: the averaged buffers are CPU torch tensors passed to the communicator as ``native`` (what a
torch-aware allocator does), so Horovod's torch binding reduces them in place; otherwise they are numpy arrays.
Writes OUT_DIR/rank-R.json: SHA-256s of the last iterate, of the averaged bits and of the finalized model, the
Horovod binding used and the framework modules the process imported.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import torch

import iteravg
from iteravg import collectives

EPOCHS, STEPS = 4, 6


def digest(arrays: dict) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(arrays[k]).tobytes() for k in sorted(arrays))).hexdigest()


def main() -> None:
    out, native = Path(sys.argv[1]), "--native" in sys.argv[2:]
    created: List[torch.Tensor] = []

    def torch_allocator(n: int, dtype: np.dtype) -> Tuple[np.ndarray, Any]:
        tensor = torch.zeros(max(int(n), 1), dtype=torch.from_numpy(np.zeros(0, dtype=dtype)).dtype)
        created.append(tensor)
        return tensor.numpy()[:n], tensor

    kwargs = {"alloc": torch_allocator} if native else {}
    avg = iteravg.Averager(iteravg.NTASchedule(epochs=EPOCHS, n=1, fallback_alpha=0.5), **kwargs)
    rank = avg.comm.rank
    torch.manual_seed(rank)  # different initial weights on every rank
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    model[0].half()  # a float16 layer too: one dtype group per dtype
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for epoch in range(EPOCHS):
        for _ in range(STEPS):
            x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
            opt.zero_grad()
            pred = model[2](model[1](model[0](x.half()).double()))
            torch.nn.functional.mse_loss(pred, x.sum(dim=1, keepdim=True).sin()).backward()
            opt.step()
            avg.step(params)
        avg.epoch_end(params, metric=[5.0, 4.0, 4.5, 4.2][epoch] + 0.01 * rank, epoch=epoch + 1)
    last = digest(params)  # this rank's last iterate: differs across ranks
    loaded = avg.finalize(params)  # collective: every rank's model now holds the average
    averaged = avg.averaged()
    native_backed = native and all(any(np.shares_memory(v, t.numpy()) for t in created) for v in averaged.values())
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "size": avg.comm.size, "comm": avg.comm.name, "binding": getattr(avg.comm, "binding", None),
        "averaged_digest": digest(averaged), "loaded": loaded, "counter": avg.average_counter,
        "model_digest": digest({n: p.detach().numpy() for n, p in model.named_parameters()}),
        "last_digest": last, "native_backed": native_backed,
        "frameworks": sorted(m for m in ("mxnet", "torch", "horovod.mxnet", "horovod.torch") if m in sys.modules),
    }))
    collectives.finish(avg.comm)


if __name__ == "__main__":
    main()
