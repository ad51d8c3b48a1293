"""``iteravg.torch.Averager`` vs PyTorch's own averaging vs the memory-bandwidth bound, measured side by side.

    python benchmarks/bench_torch.py                          # per-step paths, CPU (OMP_NUM_THREADS=1 by default)
    python benchmarks/bench_torch.py --device cuda --json r.json
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_torch.py --sync             # epoch-end sync, 2 ranks
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_torch.py --sync --device cuda   # NCCL, >= 2 GPUs

**Per step** (one process), on the same model, in rounds that visit every path once (alternating the order, so a
drift in machine load hits all alike), median over rounds:

* ``Averager.step()`` -- an EMA (``EMASchedule(decay, warmup=False)``) with ``check_finite=True`` (the default: one
  fused max-abs of the iterate and a one-flag device-to-host copy per step) and with ``check_finite=False``;
* ``Averager.step()`` before averaging starts (NTA not yet triggered: nothing to fold);
* ``Averager.epoch_end()`` on one process (the trigger, the epoch-end fold; the sync has no peer);
* ``with Averager.swapped(sync=False): pass`` -- the averaged weights in and the training weights back;
* ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)).update_parameters(model)``;
* timm's ``ModelEmaV3`` update: walk both ``state_dict()`` s, ``torch._foreach_lerp_`` over the floating tensors;
* a bare ``torch._foreach_lerp_`` over prebuilt parameter lists (no Python work at all: the op's own floor);
* the **bound**: a fold reads the iterate and the average and writes the average, 3 x 4 bytes per float32
  parameter, at the bandwidth of a large tensor copy (read + write counted) measured in the same run; a swap copies
  three times (24 bytes per parameter).

for (a) 200 x Linear(256, 256): 400 tensors, 13.2M float32 parameters, and (b) 1000 x Linear(8, 8): 2,000 small
tensors. CUDA times synchronise the device around each timed call (``--inner`` calls per timing).

**Epoch-end sync** (``--sync``, under torchrun): every rank starts from its own random weights (independent
replicas), so each sync really averages different bytes. Rank 0 reports the median of ``epoch_end()`` (epoch-end fold
+ sync: allreduce-sum of the flat average, the fused scale-and-fingerprint pass, the fingerprint check), ``step()``
alone, the public ``sync()`` after a step (plus the did-anyone-fold round trip), ``with swapped(): pass`` after a
step (sync + swap), and one raw ``dist.all_reduce`` of a flat tensor of the same bytes; and checks that the ranks'
averages are bitwise identical at the end. Beside it, ``sync()`` of a second model that is the same on every rank
(data-parallel replicas, as under DDP): its per-tensor fingerprints agree, so no tensor moves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

import iteravg  # noqa: E402
from iteravg.torch import Averager  # noqa: E402

DECAY = 0.999
CASES = [("a", "400 tensors, 13.2M params (200 x Linear(256, 256))", 200, 256),
         ("b", "2000 small tensors (1000 x Linear(8, 8))", 1000, 8)]


def dense(layers: int, units: int, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(units, units) for _ in range(layers)]).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Bytes per second of a large tensor copy on ``device``, read + write counted (best of ``reps``)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first copy pages the destination in: not counted
    times = []
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / min(times)


def rounds(paths: Dict[str, Callable[[], object]], reps: int, inner: int, device: torch.device,
           before: Optional[Dict[str, Callable[[], object]]] = None, barrier: Callable[[], None] = lambda: None
           ) -> Dict[str, float]:
    """Median seconds per call of each path, timed in rounds that visit every path once, alternating the order.
    ``before[name]`` runs untimed ahead of each timing (e.g. a fold that makes the next sync real)."""
    names = list(paths)
    for name in names:  # warm-up: the first fold copies, first calls allocate
        for _ in range(2):
            paths[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            if before and name in before:
                before[name]()
            synchronize(device)
            barrier()
            t = time.perf_counter()
            for _ in range(inner):
                paths[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - t) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timm_ema_update(ema: nn.Module, model: nn.Module) -> None:
    """timm's ``ModelEmaV3._update`` (foreach path): both state_dicts walked every step, one fused lerp."""
    with torch.no_grad():
        ema_values, model_values = [], []
        for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                ema_values.append(e)
                model_values.append(m)
            else:
                e.copy_(m)
        torch._foreach_lerp_(ema_values, model_values, weight=1.0 - DECAY)


def ema_averager(model: nn.Module, check_finite: bool = True) -> Averager:
    return Averager(model, iteravg.EMASchedule(decay=DECAY, warmup=False), comm="local", check_finite=check_finite)


def swap_nothing(avg: Averager) -> None:
    with avg.swapped(sync=False):
        pass


def step_case(key: str, label: str, layers: int, units: int, device: torch.device, bw: float, reps: int,
              inner: int) -> dict:
    model = dense(layers, units, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    checked, unchecked, at_epoch_end, swapping = (ema_averager(model), ema_averager(model, check_finite=False),
                                                  ema_averager(model), ema_averager(model))
    idle = Averager(model, iteravg.NTASchedule(epochs=100), comm="local")  # not triggered: step folds nothing
    swapping.step()
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=False)
    timm_copy = dense(layers, units, device)
    bare_avg = [p.detach().clone() for p in model.parameters()]
    bare_params = [p.detach() for p in model.parameters()]
    paths: Dict[str, Callable[[], object]] = {
        "step": checked.step,
        "step_unchecked": unchecked.step,
        "step_idle": idle.step,
        "epoch_end": lambda: at_epoch_end.epoch_end(),
        "swapped": lambda: swap_nothing(swapping),
        "averaged_model": lambda: reference.update_parameters(model),
        "timm_foreach": lambda: timm_ema_update(timm_copy, model),
        "bare_foreach_lerp": lambda: torch._foreach_lerp_(bare_avg, bare_params, 1.0 - DECAY),
    }
    med = rounds(paths, reps, inner, device)
    bound = 12 * n_params / bw
    row = dict(case=key, label=label, tensors=n_tensors, params=n_params, bound_ms=bound * 1e3,
               swap_bound_ms=2 * bound * 1e3, **{f"{k}_ms": v * 1e3 for k, v in med.items()})
    row.update(step_over_bound=med["step"] / bound, step_unchecked_over_bound=med["step_unchecked"] / bound,
               swapped_over_swap_bound=med["swapped"] / (2 * bound),
               averaged_model_over_step=med["averaged_model"] / med["step"],
               timm_over_step=med["timm_foreach"] / med["step"],
               bare_over_step=med["bare_foreach_lerp"] / med["step"],
               check_finite_cost=med["step"] / med["step_unchecked"])
    return row


def print_step_row(row: dict) -> None:
    def ms(k: str) -> str:
        return f"{row[k + '_ms']:.3f} ms"

    print(f"({row['case']}) {row['label']}: {row['tensors']} tensors, {row['params'] / 1e6:.2f}M params | "
          f"bound {row['bound_ms']:.3f} ms | step {ms('step')} = {row['step_over_bound']:.2f}x bound | "
          f"step check_finite=False {ms('step_unchecked')} = {row['step_unchecked_over_bound']:.2f}x | "
          f"step before averaging {ms('step_idle')} | epoch_end (1 process) {ms('epoch_end')} | "
          f"swapped {ms('swapped')} = {row['swapped_over_swap_bound']:.2f}x its bound | "
          f"AveragedModel {ms('averaged_model')} | timm foreach {ms('timm_foreach')} | "
          f"bare _foreach_lerp_ {ms('bare_foreach_lerp')}", flush=True)
    print(f"RATIOS ({row['case']}): step/bound = {row['step_over_bound']:.2f}, "
          f"AveragedModel/step = {row['averaged_model_over_step']:.2f}, timm/step = {row['timm_over_step']:.2f}, "
          f"bare lerp/step = {row['bare_over_step']:.2f}, check_finite cost = {row['check_finite_cost']:.2f}x",
          flush=True)


def run_steps(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    bw = bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 28))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"torch {torch.__version__} on {name}; tensor copy bandwidth {bw / 1e9:.1f} GB/s; medians of {args.reps} "
          f"rounds x {args.inner} call(s)", flush=True)
    rows = []
    for key, label, layers, units in CASES:
        row = step_case(key, label, layers, units, device, bw, args.reps, args.inner)
        print_step_row(row)
        rows.append(row)
    return dict(mode="step", device=str(device), device_name=name, torch=torch.__version__,
                bandwidth_gbps=bw / 1e9, rows=rows)


def run_sync(args: argparse.Namespace) -> Optional[dict]:
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("--sync runs under torchrun: torchrun --standalone --nproc_per_node 2 "
                         "benchmarks/bench_torch.py --sync")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = dense(200, 256, device, seed=1000 + rank)  # independent replicas: every sync averages other bytes
    schedule = iteravg.Schedule()
    schedule.averaging_started = True
    avg = Averager(model, schedule)  # the torch communicator on the process group above
    n = sum(p.numel() for p in model.parameters())
    replica = dense(200, 256, device, seed=1000)  # the same on every rank, as under DDP: its sync moves no tensor
    twin_schedule = iteravg.Schedule()
    twin_schedule.averaging_started = True
    twin = Averager(replica, twin_schedule)
    flat = torch.randn(n + 1, generator=torch.Generator().manual_seed(rank)).to(device)  # + the contributor slot

    def barrier() -> None:
        dist.barrier()

    def raw() -> None:
        dist.all_reduce(flat)
        flat.mul_(1.0 / world)

    paths = {"epoch_end": lambda: avg.epoch_end(), "step": avg.step, "sync": avg.sync,
             "swapped": lambda: swap_nothing_synced(avg), "raw_allreduce": raw, "sync_data_parallel": twin.sync}
    before = {"sync": avg.step, "swapped": avg.step, "sync_data_parallel": twin.step}  # a fold first: work to sync
    med = rounds(paths, args.reps, 1, device, before=before, barrier=barrier)
    averaged = avg.averaged_state_dict()
    sha = hashlib.sha256(b"".join(averaged[k].cpu().numpy().tobytes() for k in sorted(averaged))).hexdigest()
    shas: List[Optional[str]] = [None] * world
    dist.all_gather_object(shas, sha)
    result = None
    if rank == 0:
        raw_t = med["raw_allreduce"]
        result = dict(mode="sync", device=str(device), torch=torch.__version__, world=world, params=n,
                      backend=str(dist.get_backend()), identical=len(set(shas)) == 1,
                      **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                      epoch_end_over_raw=med["epoch_end"] / raw_t, sync_over_raw=med["sync"] / raw_t,
                      sync_part_over_raw=(med["epoch_end"] - med["step"]) / raw_t,
                      swapped_over_raw=med["swapped"] / raw_t,
                      sync_data_parallel_over_raw=med["sync_data_parallel"] / raw_t)
        print(f"{n / 1e6:.1f}M float32 params in 400 tensors, {world} ranks, {result['backend']} on {device}, "
              f"independent replicas, medians of {args.reps} rounds; averages identical on every rank: "
              f"{result['identical']}", flush=True)
        print(f"epoch_end {med['epoch_end'] * 1e3:.1f} ms (of which step {med['step'] * 1e3:.1f} ms) | sync() "
              f"{med['sync'] * 1e3:.1f} ms | swapped() {med['swapped'] * 1e3:.1f} ms | raw all_reduce "
              f"{raw_t * 1e3:.1f} ms | sync() of identical (data-parallel) replicas "
              f"{med['sync_data_parallel'] * 1e3:.1f} ms", flush=True)
        print(f"RATIOS (sync): epoch_end/raw = {result['epoch_end_over_raw']:.2f}, (epoch_end - step)/raw = "
              f"{result['sync_part_over_raw']:.2f}, sync()/raw = {result['sync_over_raw']:.2f}, swapped()/raw = "
              f"{result['swapped_over_raw']:.2f}, data-parallel sync()/raw = {result['sync_data_parallel_over_raw']:.2f}",
              flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return result


def swap_nothing_synced(avg: Averager) -> None:
    with avg.swapped():  # collective: sync, then the averaged weights in and the training weights back
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    ap.add_argument("--sync", action="store_true", help="the epoch-end sync on the ranks of a torchrun job")
    ap.add_argument("--quick", action="store_true", help="5 rounds instead of 21")
    ap.add_argument("--reps", type=int, help="rounds (median over them)")
    ap.add_argument("--inner", type=int, help="calls per timing (default 1 on CPU, 10 on CUDA)")
    ap.add_argument("--json", help="also write the results to this file (rank 0)")
    args = ap.parse_args()
    args.reps = args.reps or (5 if args.quick else 21)
    args.inner = args.inner or (10 if args.device.startswith("cuda") and not args.sync else 1)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    result = run_sync(args) if args.sync else run_steps(args)
    if args.json and result is not None:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
