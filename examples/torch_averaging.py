"""Iterate averaging of a PyTorch model with iteravg's framework-neutral engine (``iteravg.Averager``).

    python examples/torch_averaging.py                                                   # one process
    ITERAVG_COMM=mpi mpirun -np 2 --bind-to none python examples/torch_averaging.py      # 2 ranks, mpi4py
    ITERAVG_COMM=mpi mpirun -np 2 --bind-to none python examples/torch_averaging.py --schedule ema --independent

**PyTorch users: start from ``iteravg.torch.Averager`` instead** (``examples/torch_ddp.py`` for DDP under
``torchrun``, ``examples/torch_fsdp2.py`` for FSDP2, ``docs/torch.md``): it averages the model where its parameters
live (GPU included), uses torch.distributed, and needs none of the numpy plumbing below. This example stays as the
demonstration of the framework-neutral numpy engine (``iteravg.Averager``) that any framework can drive.

The averager sees the model as ``name -> numpy array``: ``p.detach().numpy()`` of a CPU parameter shares its
memory, and ``torch.optim`` updates parameters in place, so the views stay valid for the whole run (the script
checks that at the end). iteravg needs nothing from PyTorch; torch needs nothing from iteravg.

Distributed, two ways to train (``--independent`` picks the second):

* **data-parallel** (default): each rank takes its own shard of every epoch and the gradients are averaged with
  ``iteravg.collectives.allreduce_mean_arrays`` on numpy views of ``.grad`` -- no ``torch.distributed`` process
  group is needed, mpi4py (or Horovod) moves the numpy buffers. All ranks then hold the same iterate, as in
  any data-parallel job, and the averager's sync keeps the averages bitwise identical.
* **independent replicas** (local SGD): no gradient reduction; each rank trains on its own shard from the same
  initial weights, and only the averaging sync (an allreduce-mean of the averaged models at every epoch end)
  combines them. The ranks' last iterates differ; their averaged models are bitwise identical.

Rank 0 evaluates the averaged model alone (``avg.swapped(params, sync=False)`` issues no collective), then every
rank loads it (``finalize``, collective). ``--out DIR`` writes ``DIR/rank-R.json`` per rank (losses and a SHA-256
of the averaged bits); ``--checkpoint-dir DIR`` makes rank 0 write a snapshot whose ``averaged.safetensors`` loads
straight into a fresh model with ``safetensors.torch.load_file`` and ``model.load_state_dict``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import iteravg
from iteravg import collectives

FEATURES = 8


def make_data(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A noisy smooth regression problem (the same on every rank: shards are taken by index)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    y = np.sin(x @ np.linspace(-1.0, 1.0, FEATURES, dtype=np.float32))[:, None] + 0.1 * rng.standard_normal((n, 1))
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))


def make_schedule(kind: str, epochs: int) -> iteravg.Schedule:
    if kind == "nta":
        return iteravg.NTASchedule(epochs=epochs, n=2, fallback_alpha=0.5)  # NT-ASGD; at the latest for the 2nd half
    if kind == "ema":
        return iteravg.EMASchedule(decay=0.95)  # timm's ModelEmaV3 form, warmup included
    raise ValueError(f"--schedule must be nta or ema, got {kind!r}")


@torch.no_grad()
def mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.mse_loss(model(x), y))


def digest(arrays: Dict[str, np.ndarray]) -> str:
    return hashlib.sha256(b"".join(arrays[k].tobytes() for k in sorted(arrays))).hexdigest()


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default="nta", choices=["nta", "ema"])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--independent", action="store_true", help="no gradient averaging: local SGD per rank")
    ap.add_argument("--out", type=Path, help="write rank-R.json here")
    ap.add_argument("--checkpoint-dir", type=Path, help="rank 0 writes a snapshot here at the end")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    # The engine: comm=None picks the launcher's communicator (ITERAVG_COMM=mpi: mpi4py, no MXNet imported).
    avg = iteravg.Averager(make_schedule(args.schedule, args.epochs))
    comm = avg.comm
    # Zero-copy numpy views of the parameters: the averager reads iterates from them and writes averages into them.
    params = {name: p.detach().numpy() for name, p in model.named_parameters()}
    collectives.broadcast_arrays(comm, list(params.values()), name="example.init")  # same start on every rank

    x, y = make_data(2048, seed=1)
    x_val, y_val = make_data(512, seed=2)
    first_loss = mse(model, x_val, y_val)
    shard = np.arange(comm.rank, len(x), comm.size)  # every rank gets the same number of batches
    batches = len(shard) // args.batch_size
    for epoch in range(args.epochs):
        order = np.random.default_rng([comm.rank, epoch]).permutation(shard)
        for b in range(batches):
            idx = torch.from_numpy(order[b * args.batch_size : (b + 1) * args.batch_size])
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
            if not args.independent:  # data-parallel: mean gradient over ranks, in place in .grad
                collectives.allreduce_mean_arrays(comm, [p.grad.numpy() for p in model.parameters()],
                                                  name="example.grad")
            optimizer.step()
            avg.step(params)  # folds the iterate once averaging has started; no communication
        val_loss = collectives.mean_of_ranks(comm, [mse(model, x_val[comm.rank :: comm.size],
                                                        y_val[comm.rank :: comm.size])])[0]
        # Collective: the trigger decision, the epoch-end fold, the sync. NTA folds the epoch-end iterate again
        # (GluonTS's rule); an EMA, as in timm, folds training steps only.
        avg.epoch_end(params, metric=val_loss, epoch=epoch + 1, fold=args.schedule == "nta")
        if comm.rank == 0:
            print(f"epoch {epoch + 1}: val_loss {val_loss:.5f}  averaging {avg.averaging_started}  "
                  f"folds {avg.average_counter}", flush=True)

    assert all(np.shares_memory(params[n], p.detach().numpy()) for n, p in model.named_parameters()), \
        "the optimizer replaced a parameter tensor: rebuild the params views"
    last = {n: v.copy() for n, v in params.items()}
    last_loss = mse(model, x_val, y_val)
    averaged_loss = None
    if comm.rank == 0:  # rank-0-only evaluation: sync=False issues no collective (epoch_end synced already)
        with avg.swapped(params, sync=False):
            averaged_loss = mse(model, x_val, y_val)
        print(f"last iterate val_loss {last_loss:.5f}, averaged model val_loss {averaged_loss:.5f}", flush=True)
    restored = all(np.array_equal(params[n], v) for n, v in last.items())

    loaded = avg.finalize(params)  # collective: every rank's model now holds the (identical) average
    saved = None
    if args.checkpoint_dir is not None:
        saved = avg.save(args.checkpoint_dir, epoch=args.epochs)  # collective; rank 0 writes
    averaged = avg.averaged()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank-{comm.rank}.json").write_text(json.dumps({
            "rank": comm.rank, "size": comm.size, "comm": comm.name, "schedule": args.schedule,
            "independent": args.independent, "first_loss": first_loss, "last_loss": last_loss,
            "averaged_loss": averaged_loss, "finalized_loss": mse(model, x_val, y_val), "loaded": loaded,
            "counter": avg.average_counter, "trigger_epoch": avg.schedule.trigger_epoch,
            "averaged_digest": None if averaged is None else digest(averaged),
            "model_digest": digest({n: p.detach().numpy() for n, p in model.named_parameters()}),
            "last_digest": digest(last), "training_restored": restored,
            "snapshot": None if saved is None else str(saved),
            "mxnet_imported": "mxnet" in sys.modules,  # ITERAVG_COMM=mpi: never
        }, indent=1))
    collectives.finish(comm)  # a barrier: no rank leaves while another is still inside a collective


if __name__ == "__main__":
    main()
