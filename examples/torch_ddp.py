"""Data-parallel PyTorch training (DDP) with iteration averaging by ``iteravg.torch.Averager`` (NT-ASGD by default).

    torchrun --standalone --nproc_per_node 2 examples/torch_ddp.py --out runs/ddp      # 2 ranks, Gloo (NCCL on GPUs)
    python examples/torch_ddp.py --out runs/ddp-1                                      # one process, no launcher
    torchrun --standalone --nproc_per_node 2 examples/torch_ddp.py --schedule ema      # EMA instead of NTA

A plain DDP script as users write it -- ``init_process_group``, a ``DistributedSampler``, ``DistributedDataParallel``,
an optimizer, a validation loss reduced over the ranks -- plus four lines of iteravg:

* ``Averager(ddp_model, schedule)`` once, after the model is wrapped (it reuses the script's process group);
* ``avg.step()`` after every ``optimizer.step()``: folds the iterate on the parameters' device, no communication;
* ``avg.epoch_end(metric=val_loss, epoch=epoch)`` on every rank: the agreed NT-ASGD trigger, the epoch-end fold and
  the sync that makes the average bitwise identical on every rank;
* ``avg.save(dir)``: rank 0 writes an atomic snapshot whose ``averaged.safetensors`` loads into a plain model.

Rank 0 then evaluates the averaged model alone (``avg.swapped(sync=False)`` issues no collective) and prints the last
iterate's and the averaged model's validation loss; ``avg.finalize()`` leaves the average in every rank's model.

With ``--out DIR``: the snapshot goes to ``DIR/checkpoints/`` and every rank writes ``DIR/rank-R.json`` (a SHA-256
of its averaged tensors, the validation losses, the snapshot's path) -- what ``tests/test_torch_examples.py`` checks.
On GPUs (``torch.cuda.is_available()``) each rank uses ``cuda:LOCAL_RANK`` and NCCL; the average stays on the GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import iteravg
from iteravg.torch import Averager

FEATURES = 8


def make_model() -> nn.Module:
    """A small MLP with BatchNorm: its running statistics are averaged too, ``num_batches_tracked`` is carried."""
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.BatchNorm1d(64), nn.Tanh(), nn.Linear(64, 1))


def make_data(n: int, seed: int) -> TensorDataset:
    """A noisy smooth regression problem, the same on every rank (the sampler shards it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = torch.sin(x @ torch.linspace(-1.0, 1.0, FEATURES)).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def make_schedule(kind: str, epochs: int) -> iteravg.Schedule:
    if kind == "nta":
        return iteravg.NTASchedule(epochs=epochs, n=2, fallback_alpha=0.5)  # at the latest for the 2nd half
    if kind == "ema":
        return iteravg.EMASchedule(decay=0.99)  # timm's ModelEmaV3 form, warmup included
    raise ValueError(f"--schedule must be nta or ema, got {kind!r}")


@torch.no_grad()
def squared_error(model: nn.Module, data: TensorDataset, device: torch.device) -> Tuple[float, int]:
    """(sum of squared errors, count) of ``model`` in eval mode on ``data`` -- call it on the module inside DDP:
    DDP's own forward may talk to the other ranks, which rank-0-only evaluation must not do."""
    was_training = model.training
    model.eval()
    x, y = (t.to(device) for t in data.tensors)
    err = float(((model(x) - y) ** 2).sum())
    model.train(was_training)
    return err, len(y)


def validation_loss(model: nn.Module, data: TensorDataset, device: torch.device, rank: int, world: int) -> float:
    """Mean squared error over the whole validation set, each rank scoring its own share (all ranks call this).

    BatchNorm's running statistics are each rank's own until DDP re-broadcasts rank 0's at the next training forward,
    so this differs slightly from rank 0 scoring the whole set alone; the averaged model's are averaged across
    ranks by the sync, like its parameters."""
    share = TensorDataset(*(t[rank::world] for t in data.tensors))
    err, count = squared_error(model, share, device)
    if world == 1:
        return err / count
    total = torch.tensor([err, count], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total[0] / total[1])


def digest(state: Dict[str, torch.Tensor]) -> str:
    """SHA-256 of the floating tensors' names and bytes: equal on two ranks iff they hold the same bits."""
    h = hashlib.sha256()
    for name in sorted(k for k, v in state.items() if v.is_floating_point()):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default="nta", choices=["nta", "ema"])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", type=Path, help="snapshot in OUT/checkpoints, per-rank results in OUT/rank-R.json")
    args = ap.parse_args(argv)

    # -- the usual DDP set-up: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT ------------------
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    model = make_model().to(device)
    net: nn.Module = model
    if distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    train, val = make_data(4096, seed=1), make_data(1024, seed=2)
    # drop_last: every rank runs the same number of steps (an EMA's step count must agree across ranks).
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    loss_fn = nn.MSELoss()

    # -- iteravg: the averaged tensors live on `device`; comm=None reuses the process group above -----------
    avg = Averager(net, make_schedule(args.schedule, args.epochs))

    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        net.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()  # DDP averages the gradients
            optimizer.step()
            avg.step()  # folds the iterate once averaging has started; no communication
        val_loss = validation_loss(model, val, device, rank, world)
        # Every rank, collective: the agreed trigger on val_loss, the epoch-end fold, the sync. An EMA, as in timm,
        # folds training steps only.
        avg.epoch_end(metric=val_loss, epoch=epoch, fold=args.schedule == "nta")
        if rank == 0:
            print(f"epoch {epoch}: val_loss {val_loss:.5f}  averaging {avg.averaging_started}  "
                  f"folds {avg.average_counter}", flush=True)

    last_loss, averaged_loss = None, None
    if rank == 0:  # rank 0 alone: sync=False issues no collective (epoch_end synced already)
        err, count = squared_error(model, val, device)
        last_loss = err / count
        with avg.swapped(sync=False):
            err, count = squared_error(model, val, device)
            averaged_loss = err / count
        print(f"last iterate val_loss {last_loss:.5f}, averaged model val_loss {averaged_loss:.5f}", flush=True)

    snapshot = None
    if args.out is not None:
        snapshot = avg.save(args.out / "checkpoints", epoch=args.epochs)  # collective; rank 0 writes
        if snapshot is not None:
            print(f"averaged model: {snapshot / 'averaged.safetensors'}", flush=True)
    averaged = avg.averaged_state_dict()  # model.state_dict() names (no "module."), on `device`
    averaged_sha = None if averaged is None else digest(averaged)
    avg.finalize()  # collective: every rank's model now holds the average (or rank 0's weights without one)

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank-{rank}.json").write_text(json.dumps({
            "rank": rank, "world": world, "comm": avg.comm.name, "device": str(avg.device),
            "schedule": args.schedule, "counter": avg.average_counter, "trigger_epoch": avg.schedule.trigger_epoch,
            "averaged_sha": averaged_sha, "final_model_sha": digest(model.state_dict()),
            "last_loss": last_loss, "averaged_loss": averaged_loss,
            "snapshot": None if snapshot is None else str(snapshot),
        }, indent=1))
    if distributed:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
