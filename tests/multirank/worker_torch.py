"""A PyTorch model trained under ``torchrun`` with ``iteravg.torch.Averager``: DDP, FSDP2 (``fully_shard``) or no
wrapper, on CPU with Gloo (CUDA with NCCL where a GPU is present and ``--cuda`` is given).

usage: worker_torch.py OUT_DIR --wrap ddp|fsdp|none --schedule nta|ema|alpha [--ckpt DIR] [--resume] [--epochs N]
    [--independent]  (no gradient reduction: local SGD, each rank its own iterates)

Each rank writes OUT_DIR/rank-R.json: SHA-256 of the averaged state (``averaged_state_dict``, sorted names, bytes),
of the model after ``finalize``, counters, the trigger epoch, the communicator, and which snapshot it saved.
With --resume it first loads --ckpt (any world size) and records the SHA-256 of what it loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import iteravg
from iteravg.torch import Averager

FEATURES, STEPS, BATCH = 6, 5, 8


def digest(tensors: dict) -> str:
    """SHA-256 of the floating tensors' names and bytes (the carried counters are not averaged)."""
    h = hashlib.sha256()
    for k in sorted(k for k, v in tensors.items() if v.is_floating_point()):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast them anyway)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 1))


def data(rank: int, world: int, epoch: int, step: int, device: torch.device):
    """Every rank its own batch (DistributedSampler's idea), deterministic."""
    g = torch.Generator().manual_seed(10_000 * epoch + 100 * step + rank)
    x = torch.randn(BATCH, FEATURES, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.05 * torch.randn(BATCH, 1, generator=g)
    return x.to(device), y.to(device)


def schedule(kind: str, epochs: int) -> iteravg.Schedule:
    if kind == "nta":
        return iteravg.NTASchedule(epochs=epochs, n=1, fallback_alpha=0.5)
    if kind == "ema":
        return iteravg.EMASchedule(decay=0.9)
    if kind == "alpha":
        return iteravg.AlphaSuffixSchedule(epochs=epochs, alpha=0.5)
    raise SystemExit(f"unknown schedule {kind}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--wrap", default="ddp", choices=["ddp", "fsdp", "none"])
    ap.add_argument("--schedule", default="nta")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--independent", action="store_true")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--sharded", action="store_true", help="sharded=True: each rank keeps 1/N of the average")
    ap.add_argument("--reference", action="store_true",
                    help="also average whole-model copies of every iterate on this rank alone (comm='local'): the "
                         "sharded average must equal it bit for bit")
    args = ap.parse_args()

    device = torch.device("cpu")
    if args.cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # The user's own process group, as a DDP script sets it up; iteravg reuses it (no second rendezvous).
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if args.cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    model = make_model().to(device)
    net: nn.Module = model
    if args.wrap == "ddp" and world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    elif args.wrap == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
    avg = Averager(net, schedule(args.schedule, args.epochs), sharded=True if args.sharded else None)

    shadow, reference = None, None
    if args.reference:  # the whole model, gathered after every step: what an unsharded average would see
        shadow = make_model()
        reference = Averager(shadow, schedule(args.schedule, args.epochs), comm="local")

    def mirror() -> None:
        with torch.no_grad():
            for name, t in iteravg.torch.unwrap(net).state_dict().items():
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                shadow.state_dict()[name].copy_(full.cpu())

    result: dict = {"rank": rank, "world": world, "comm": avg.comm.name, "device": str(avg.device),
                    "sharded": avg.sharded}
    first_epoch = 1
    if args.resume:
        record = avg.load(args.ckpt)
        loaded = avg.averaged_state_dict()
        result["loaded_sha"] = None if loaded is None else digest(loaded)
        result["loaded_counter"] = avg.average_counter
        result["loaded_world"] = record.get("world_size")
        first_epoch = int(record["epoch"]) + 1

    for epoch in range(first_epoch, first_epoch + args.epochs):
        net.train()
        losses = []
        for step in range(STEPS):
            x, y = data(rank if not args.independent else rank, world, epoch, step, device)
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            avg.step()
            if reference is not None:
                mirror()
                reference.step()
            losses.append(float(loss.detach()))
        metric = [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5][(epoch - 1) % 12] + 0.01 * rank
        avg.epoch_end(metric=metric, epoch=epoch)
        if reference is not None:
            mirror()
            reference.epoch_end(metric=metric, epoch=epoch)
        if rank == 0 and args.wrap != "fsdp" and not args.sharded:  # validation on rank 0 only: no collective (the
            model.eval()  # inner module, since DDP's forward broadcasts buffers)
            with avg.swapped(sync=False), torch.no_grad():
                x, y = data(99, world, epoch, 0, device)
                result.setdefault("val", []).append(float(nn.functional.mse_loss(model(x), y)))
    averaged = avg.averaged_state_dict()
    result["averaged_sha"] = None if averaged is None else digest(averaged)
    result["counter"] = avg.average_counter
    if reference is not None:
        params = {n for n, _ in iteravg.torch.unwrap(net).named_parameters()}
        ref = reference.averaged_state_dict()
        result["params_equal_reference"] = all(torch.equal(averaged[n].cpu(), ref[n]) for n in params)
    result["trigger_epoch"] = avg.schedule.trigger_epoch
    if args.ckpt is not None:
        path = avg.save(args.ckpt, epoch=first_epoch + args.epochs - 1)
        result["snapshot"] = None if path is None else str(path)
    if avg.finalize():
        sd = {k: v for k, v in iteravg.torch.unwrap(net).state_dict().items() if v.is_floating_point()}
        if args.wrap == "fsdp":
            sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}
        result["final_model_sha"] = digest(sd)
    result["imported_mxnet"] = "mxnet" in sys.modules
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
