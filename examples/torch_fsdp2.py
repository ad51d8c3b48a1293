"""FSDP2 (``fully_shard``) training with iteration averaging by ``iteravg.torch.Averager``: the average of each
parameter lives on its rank's own shard, snapshots hold the gathered whole, and a run resumes at any world size.

    torchrun --standalone --nproc_per_node 2 examples/torch_fsdp2.py --out runs/fsdp --epochs 4
    torchrun --standalone --nproc_per_node 3 examples/torch_fsdp2.py --out runs/fsdp --epochs 6 --resume
    python examples/torch_fsdp2.py --out runs/fsdp --epochs 8 --resume            # one process (a 1-rank group)
    torchrun --standalone --nproc_per_node 2 examples/torch_fsdp2.py --schedule nta

What iteravg does here (torchtitan's design): ``avg.step()`` folds each rank's local shard of every parameter into
its local shard of the average -- no communication, no gathered copy, the averaged state costs one shard of memory
per rank. ``avg.epoch_end`` agrees the trigger (NTA) across ranks; ``avg.swapped()`` puts the averaged shards into the
model for a validation pass every rank takes part in (FSDP2's forward is collective). ``avg.save`` gathers the
average into one ``averaged.safetensors`` (``model.state_dict()`` names, loadable into a plain model) and writes the
last training iterate beside it (``training.safetensors``, gathered with ``torch.distributed.checkpoint``'s
``get_model_state_dict(full_state_dict=True)``), in one atomic snapshot written by rank 0.

``--resume`` continues from ``OUT/checkpoints`` on any number of ranks: ``avg.load`` gives every rank its own
shard of the saved average and the averaging progress; the training weights are broadcast from rank 0 into the new
sharding (``set_model_state_dict(broadcast_from_rank0=True)``). SGD's momentum restarts at zero (save it the same
way with ``get_optimizer_state_dict`` if it matters). ``--epochs`` is the total: a resumed run trains the epochs
after the snapshot's.

Without a launcher the script makes a one-process group itself (FSDP2 needs one). On GPUs each rank uses
``cuda:LOCAL_RANK`` and NCCL. With ``--out DIR`` every rank writes ``DIR/rank-R.json`` (SHA-256 of the averaged and
training weights, counters), what ``tests/test_torch_examples.py`` checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import iteravg
from iteravg.checkpoint import read_snapshot
from iteravg.torch import Averager

FEATURES, HIDDEN = 8, 64
TRAINING_FILE = "training.safetensors"


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                         nn.Linear(HIDDEN, 1))


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = torch.sin(x @ torch.linspace(-1.0, 1.0, FEATURES)).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def make_schedule(kind: str, epochs: int) -> iteravg.Schedule:
    if kind == "ema":
        return iteravg.EMASchedule(decay=0.99)
    if kind == "nta":
        return iteravg.NTASchedule(epochs=epochs, n=2, fallback_alpha=0.5)
    raise ValueError(f"--schedule must be ema or nta, got {kind!r}")


def init_distributed(device: torch.device) -> None:
    """torchrun's environment, or a one-process group when started without a launcher (FSDP2 needs a group)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
        return
    with socket.socket() as s:  # a free port on this host for the one-process store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


@torch.no_grad()
def validation_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Mean squared error over the whole set, each rank scoring its share. Every rank must call it: an FSDP2
    forward all-gathers the parameters."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model.eval()
    err = ((model(x[rank::world].to(device)) - y[rank::world].to(device)) ** 2).sum()
    model.train()
    total = torch.stack([err.double(), torch.tensor(float(len(y[rank::world])), dtype=torch.float64,
                                                    device=device)])
    dist.all_reduce(total)
    return float(total[0] / total[1])


def digest(state: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(k for k, v in state.items() if v.is_floating_point()):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def full_training_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The training weights gathered into whole tensors on rank 0's CPU (collective; ``{}`` on other ranks)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default="ema", choices=["ema", "nta"])
    ap.add_argument("--epochs", type=int, default=6, help="total epochs, counting those before a --resume")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=Path("runs/fsdp2"),
                    help="snapshots in OUT/checkpoints, per-rank results in OUT/rank-R.json")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints (any number of ranks)")
    args = ap.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    init_distributed(device)
    rank, world = dist.get_rank(), dist.get_world_size()

    model = make_model().to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # parameters are now DTensors, each rank holding rows of every one
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    avg = Averager(model, make_schedule(args.schedule, args.epochs))  # reuses the process group
    checkpoints = args.out / "checkpoints"
    result: dict = {"rank": rank, "world": world, "comm": avg.comm.name, "device": str(avg.device)}

    first_epoch = 1
    if args.resume:
        record = avg.load(checkpoints)  # collective: every rank gets its shard of the saved average
        first_epoch = int(record["epoch"]) + 1
        saved = {}
        if rank == 0:
            snapshot, _ = read_snapshot(checkpoints)  # SHA-256 verified
            saved = load_file(str(snapshot / TRAINING_FILE))
        set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        loaded = avg.averaged_state_dict()  # gathered: collective
        result.update(resumed_from_epoch=first_epoch - 1, resumed_from_world=record.get("world_size"),
                      loaded_sha=None if loaded is None else digest(loaded), loaded_counter=avg.average_counter)
        restored = full_training_state(model)
        if rank == 0:
            result["loaded_training_sha"] = digest(restored)
            print(f"resumed at epoch {first_epoch - 1} (saved by {record.get('world_size')} ranks) on {world}",
                  flush=True)

    x, y = make_data(4096, seed=1)
    x_val, y_val = make_data(1024, seed=2)
    batches = len(x) // world // args.batch_size  # the same number of steps on every rank
    for epoch in range(first_epoch, args.epochs + 1):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))[rank::world]
        for b in range(batches):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x[idx].to(device)), y[idx].to(device)).backward()  # FSDP2 reduces grads
            optimizer.step()
            avg.step()  # folds this rank's shards into its shard of the average: no communication
        val_loss = validation_loss(model, x_val, y_val, device)
        avg.epoch_end(metric=val_loss, epoch=epoch, fold=args.schedule == "nta")  # collective
        if rank == 0:
            print(f"epoch {epoch}: val_loss {val_loss:.5f}  averaging {avg.averaging_started}  "
                  f"folds {avg.average_counter}", flush=True)

    last_loss = validation_loss(model, x_val, y_val, device)
    with avg.swapped():  # collective: every rank evaluates its share with the averaged shards in place
        averaged_loss = validation_loss(model, x_val, y_val, device)
    if rank == 0:
        print(f"last iterate val_loss {last_loss:.5f}, averaged model val_loss {averaged_loss:.5f}", flush=True)

    training = full_training_state(model)  # collective: rank 0 holds the whole last iterate
    snapshot = avg.save(checkpoints, epoch=args.epochs,  # collective; rank 0 writes one atomic snapshot
                        extra_files={TRAINING_FILE: lambda path: save_file(training, str(path))})
    if snapshot is not None:
        print(f"averaged model: {snapshot / 'averaged.safetensors'}", flush=True)
    averaged = avg.averaged_state_dict()  # the gathered whole, host tensors, on every rank (collective)
    result.update(schedule=args.schedule, counter=avg.average_counter, trigger_epoch=avg.schedule.trigger_epoch,
                  averaged_sha=None if averaged is None else digest(averaged),
                  training_sha=digest(training) if rank == 0 else None, last_loss=last_loss,
                  averaged_loss=averaged_loss, snapshot=None if snapshot is None else str(snapshot))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
