"""A LightningModule trained by ``lightning.Trainer`` with ``iteravg.lightning.IterationAveraging``: Lightning's own DDP
(its subprocess launcher starts rank 1 by re-running this script), FSDP2 through Lightning's ``ModelParallelStrategy``,
or one process without a launcher; CPU, Gloo.

usage: worker_lightning.py OUT_DIR --strategy ddp|fsdp|single [--schedule nta|alpha|ema] [--epochs N]
    [--resume-epoch K] [--no-val] [--control] [--sharded]

Fit A trains ``--epochs`` epochs and writes a full checkpoint at every epoch end (ModelCheckpoint, save_top_k=-1) into
OUT_DIR/ckpt. With ``--resume-epoch K`` the same processes then run fit B: a fresh model and callback resumed from
epoch K's checkpoint (``fit(ckpt_path=...)``) up to the same epoch count -- its average must be A's, bit for bit.
Each rank writes OUT_DIR/rank-R.json: SHA-256 of the averaged state and of the final model for each fit, counters,
the trigger epoch and the metric log the trigger saw, and a digest of the first training batch this rank drew.
``--control`` adds fit C, the same training without averaging: swapping the average in and out for validation and
between epochs must leave the training weights' path unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402

import iteravg  # noqa: E402
from iteravg.lightning import IterationAveraging  # noqa: E402

FEATURES, ROWS, BATCH = 6, 64, 8


def digest(tensors: dict) -> str:
    """SHA-256 of the floating tensors' names and bytes (the carried counters are not averaged)."""
    h = hashlib.sha256()
    for k in sorted(k for k, v in tensors.items() if v.is_floating_point()):
        full = tensors[k].full_tensor() if hasattr(tensors[k], "full_tensor") else tensors[k]
        h.update(k.encode())
        h.update(full.detach().cpu().clone().numpy().tobytes())  # a copy: .numpy() pins a storage FSDP frees
    return h.hexdigest()


def dataset(seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, FEATURES, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.05 * torch.randn(ROWS, 1, generator=g)
    return TensorDataset(x, y)


class Regressor(pl.LightningModule):
    """Linear + BatchNorm + Linear: parameters and averaged buffers; SGD with momentum (state a resume restores).
    FSDP2: LayerNorm instead -- FSDP2 does not synchronise buffers, so BatchNorm's running statistics differ per rank
    and a distributed checkpoint keeps one rank's, which a resume then cannot continue bit for bit."""

    def __init__(self, fsdp: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        norm = nn.LayerNorm(32) if fsdp else nn.BatchNorm1d(32)
        self.net = nn.Sequential(nn.Linear(FEATURES, 32), norm, nn.ReLU(), nn.Linear(32, 1))
        self.fsdp = fsdp
        self.first_batch = None

    def configure_model(self) -> None:
        if not self.fsdp:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.first_batch is None:
            self.first_batch = hashlib.sha256(x.numpy().tobytes()).hexdigest()
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5)


def schedule(kind: str, epochs: int) -> iteravg.Schedule:
    if kind == "nta":
        return iteravg.NTASchedule(epochs=epochs, n=1)
    if kind == "alpha":
        return iteravg.AlphaSuffixSchedule(epochs=epochs, alpha=0.5)
    if kind == "ema":
        return iteravg.EMASchedule(decay=0.9)
    raise SystemExit(f"unknown schedule {kind}")


def strategy(kind: str):
    if kind == "ddp":
        return dict(strategy="ddp", devices=2)
    if kind == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return dict(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2)
    return dict(devices=1)


class Trained(pl.Callback):
    """Placed before IterationAveraging: the digest of the training parameters at each epoch's end."""

    def __init__(self) -> None:
        self.epochs: dict = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Parameters only: under DDP, BatchNorm's running statistics are per rank between forwards (DDP broadcasts
        # rank 0's at the start of each forward), so they are not expected to agree across ranks.
        self.epochs.setdefault(trainer.current_epoch, {})["trained"] = digest(dict(pl_module.named_parameters()))


class Averaged(pl.Callback):
    """Placed after IterationAveraging: the digest of the average after each epoch's end."""

    def __init__(self, cb: IterationAveraging, epochs: dict) -> None:
        self.cb, self.epochs = cb, epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        averaged = self.cb.averager.averaged_state_dict()  # collective when sharded: every rank calls it
        self.epochs.setdefault(trainer.current_epoch, {})["averaged"] = None if averaged is None else digest(averaged)


def fit(args, ckpt: Path, resume: Path = None, averaging: bool = True) -> dict:
    model = Regressor(fsdp=args.strategy == "fsdp")
    cb = IterationAveraging(schedule(args.schedule, args.epochs), monitor="val_loss", sharded=args.sharded or None)
    saver = pl.callbacks.ModelCheckpoint(dirpath=ckpt, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trained = Trained()
    callbacks = [trained, cb, Averaged(cb, trained.epochs), saver] if averaging else [trained, saver]
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                         **strategy(args.strategy))
    val = None if args.no_val else DataLoader(dataset(2), batch_size=BATCH)
    trainer.fit(model, DataLoader(dataset(1), batch_size=BATCH), val, ckpt_path=resume)
    result: dict = {}
    if not averaging:
        return {"epochs": trained.epochs}
    avg = cb.averager
    averaged = avg.averaged_state_dict()
    result.update(averaged_sha=None if averaged is None else digest(averaged), counter=avg.average_counter,
                  trigger_epoch=avg.schedule.trigger_epoch, val_logs=list(getattr(avg.schedule, "val_logs", [])),
                  final_model_sha=digest(model.state_dict()), comm=avg.comm.name, world=avg.comm.size,
                  global_step=trainer.global_step, first_batch=model.first_batch, epochs=trained.epochs,
                  sharded=avg.sharded)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "single"])
    ap.add_argument("--schedule", default="nta")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--resume-epoch", type=int)
    ap.add_argument("--no-val", action="store_true")
    ap.add_argument("--control", action="store_true")
    ap.add_argument("--sharded", action="store_true", help="IterationAveraging(sharded=True): 1/N of the average per rank")
    args = ap.parse_args()
    ckpt = args.out / "ckpt"
    result = {"a": fit(args, ckpt)}
    if args.resume_epoch is not None:
        name = f"epoch={args.resume_epoch - 1}.ckpt"  # Lightning counts epochs from 0
        result["b"] = fit(args, args.out / "ckpt-b", resume=ckpt / name)
    if args.control:  # the same fit without averaging: the training weights must follow the same path
        result["control"] = fit(args, args.out / "ckpt-c", averaging=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    result["rank"] = rank
    result["imported_mxnet"] = "mxnet" in sys.modules
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
