"""The CUDA path of ``iteravg.torch``: the averaged state on the parameters' CUDA device, folds with no host copy,
bitwise equality with ``torch.optim.swa_utils.AveragedModel`` on the same device, the fingerprint computed on the
device equal to the numpy fingerprint of the same bytes, a snapshot written from the GPU verified and loaded on the
host, and 2-rank torchrun jobs on GPUs (NCCL with two GPUs; Gloo with two ranks sharing one GPU).

Every single-process check is parametrised over ``cpu`` and ``cuda``: the CPU variant runs everywhere (so the
check's own logic is exercised on every machine), the CUDA variant skips, with the reason, where
``torch.cuda.is_available()`` is False (the CPU wheel). On a GPU machine: ``scripts/gpu_check.sh``.

torch is imported when a test runs, not when pytest collects this file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import run  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="PyTorch is not installed (optional: requirements/torch.txt)")
WORKER = "tests/multirank/worker_torch.py"


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)")
    return torch.device(request.param, 0) if request.param == "cuda" else torch.device("cpu")


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_model(device, dtype=None):
    import torch

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 17), torch.nn.ReLU(), torch.nn.Linear(17, 33),
                                torch.nn.Tanh(), torch.nn.Linear(33, 2))
    return model.to(device=device, dtype=dtype)


def train_steps(model, steps: int, *callbacks) -> None:
    """SGD with momentum on random data (drawn on the host, so every device sees the same batches)."""
    import torch

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=g).to(device=device, dtype=dtype)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        for cb in callbacks:
            cb()


def started(schedule):
    schedule.averaging_started = True
    return schedule


def test_state_lives_on_the_parameters_device(device):
    import iteravg
    from iteravg.torch import Averager

    model = make_model(device)
    avg = Averager(model, started(iteravg.Schedule()), comm="local")
    train_steps(model, 4, avg.step)
    assert avg.device == device and avg.average_counter == 4
    state = avg.engine.state
    assert all(state.current(g).device == device for g in range(len(state.layout.groups)))
    averaged = avg.averaged_state_dict()
    assert averaged and all(t.device == device for t in averaged.values())
    with avg.swapped(sync=False):  # the swap stays on the device too
        assert all(p.device == device for p in model.parameters())


def test_cuda_folds_copy_nothing_between_host_and_device():
    """Under the profiler: with ``check_finite=False`` a fold moves no byte between host and device; with the
    default check, at most one tiny device-to-host copy (the all-finite flag) per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import iteravg
    from iteravg.torch import Averager

    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)")
    steps = 5
    for check_finite in (True, False):  # first the case that must show its one flag copy: the profiler sees copies
        model = make_model(torch.device("cuda", 0))
        avg = Averager(model, iteravg.EMASchedule(decay=0.9, warmup=False), comm="local", check_finite=check_finite)
        avg.step()  # the first fold copies; bind and allocate outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                assert avg.step()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        device_events = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
        if not device_events:
            pytest.skip("the profiler recorded no CUDA activity (CUPTI unavailable): cannot see copies")
        to_host = sum("Memcpy DtoH" in n for n in names)
        to_device = sum("Memcpy HtoD" in n for n in names)
        assert to_device == 0, names
        if check_finite:
            assert 0 < to_host <= steps, (to_host, sorted(set(names)))
        else:
            assert to_host == 0, sorted(set(names))


@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
def test_non_finite_iterates_are_refused_and_huge_finite_ones_folded(device, poison):
    """An iterate holding a NaN, +inf or -inf leaves the average and the counter untouched (one diverged step must
    not poison an EMA); a huge but finite one (its 2-norm overflows float32) is folded like any other."""
    import torch

    import iteravg
    from iteravg.torch import Averager

    model = make_model(device)
    avg = Averager(model, iteravg.EMASchedule(decay=0.5, warmup=False), comm="local")
    train_steps(model, 2, avg.step)
    before = {k: v.clone() for k, v in avg.averaged_state_dict().items()}
    weight = model[2].weight
    with torch.no_grad():
        saved = weight[3, 4].item()
        weight[3, 4] = float(poison)
    assert not avg.step() and avg.refused_nonfinite == 1 and avg.average_counter == 2
    assert all(torch.equal(before[k], v) for k, v in avg.averaged_state_dict().items())
    with torch.no_grad():
        weight[3, 4] = saved
        weight[0].fill_(3e37)  # finite; the sum of squares overflows
    assert avg.step() and avg.average_counter == 3 and avg.refused_nonfinite == 1
    assert bool(torch.isfinite(avg.averaged_state_dict()["2.weight"]).all())
    assert avg.check_finite


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_bitwise_equal_to_swa_utils_averaged_model(device, kind):
    """The same iterates into iteravg and into ``AveragedModel(multi_avg_fn=...)``: the same bits, on the device."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

    import iteravg
    from iteravg.torch import Averager

    model = make_model(device)
    if kind == "swa":
        schedule, fn = started(iteravg.Schedule()), get_swa_multi_avg_fn()
    else:
        schedule, fn = iteravg.EMASchedule(decay=0.9, warmup=False), get_ema_multi_avg_fn(0.9)
    avg = Averager(model, schedule, comm="local")
    theirs = AveragedModel(model, multi_avg_fn=fn, use_buffers=False)
    train_steps(model, 30, avg.step, lambda: theirs.update_parameters(model))
    ours = avg.averaged_state_dict()
    reference = dict(theirs.module.named_parameters())
    assert set(reference) <= set(ours)
    for name, t in reference.items():
        assert ours[name].device == t.device == device
        assert torch.equal(ours[name], t.detach()), f"{name} differs from AveragedModel's ({kind}, {device})"
    assert not torch.equal(ours["0.weight"], model[0].weight.detach()), "nothing was averaged"


@pytest.mark.parametrize("wrap", ["compile", "dataparallel"])
def test_wrapped_models_average_like_the_plain_model_under_its_names(device, wrap):
    """``torch.compile`` (OptimizedModule, names prefixed ``_orig_mod.``) and ``DataParallel`` (``module.``): the
    averager finds the user's module, names the average as the plain model's ``state_dict`` does, and folds the same
    bits as an averager on an unwrapped twin trained alike."""
    import torch

    import iteravg
    from iteravg.torch import Averager

    plain, inner = make_model(device), make_model(device)
    wrapped = torch.compile(inner, backend="eager") if wrap == "compile" else torch.nn.DataParallel(inner)
    assert all(k.startswith(("_orig_mod.", "module.")) for k in wrapped.state_dict())
    ours = Averager(wrapped, started(iteravg.Schedule()), comm="local")
    reference = Averager(plain, started(iteravg.Schedule()), comm="local")
    train_steps(wrapped, 12, ours.step)
    train_steps(plain, 12, reference.step)
    got, want = ours.averaged_state_dict(), reference.averaged_state_dict()
    assert set(got) == set(want) == set(inner.state_dict())
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs ({wrap}, {device})"
    assert not torch.equal(got["0.weight"], inner[0].weight.detach()), "nothing was averaged"


def test_fingerprint_on_the_device_equals_the_numpy_fingerprint(device):
    """Odd lengths (a trailing partial 8-byte word), every dtype, a buffer longer than one chunk of the device
    computation, and the state's own fingerprint after folds."""
    import torch

    import iteravg
    from iteravg.core.averaged import fingerprint
    from iteravg.core.torch_state import _CHUNK_WORDS, torch_fingerprint
    from iteravg.torch import Averager

    g = torch.Generator().manual_seed(11)
    buffers = [torch.randn(1001, generator=g), torch.randn(7, generator=g).half(), torch.randn(5, generator=g).double(),
               torch.randn(3, generator=g), torch.randn(2 * _CHUNK_WORDS + 5, generator=g)]  # 2 chunks + a tail
    for case in ([b] for b in buffers):
        on_device = [b.to(device) for b in case]
        expected = fingerprint([b.numpy() for b in case])
        assert np.array_equal(torch_fingerprint(on_device), expected), (case[0].dtype, case[0].numel())
    assert np.array_equal(torch_fingerprint([b.to(device) for b in buffers]), fingerprint([b.numpy() for b in buffers]))

    model = make_model(device)
    avg = Averager(model, started(iteravg.Schedule()), comm="local")
    train_steps(model, 3, avg.step)
    state = avg.engine.state
    host = [state.current(g).cpu().numpy() for g in range(len(state.layout.groups))]
    assert np.array_equal(state.fingerprint(), fingerprint(host))


def test_per_tensor_fingerprints_on_the_device_equal_numpy(device):
    """The sync's per-tensor identity fingerprints (which tensors already agree across ranks): the device computation
    against the numpy / C one, on adjacent ranges of float32, float16 and float64 buffers (empty ranges included),
    and the state's own method."""
    import torch

    from iteravg.core._kernel import segment_fingerprints
    from iteravg.core.averaged import range_bounds
    from iteravg.core.torch_state import torch_segment_fingerprints

    g = torch.Generator().manual_seed(5)
    ranges = [(0, 3), (3, 3), (3, 1000), (1000, 1001), (1001, 4099)]
    for dtype in (torch.float32, torch.float16, torch.float64):
        flat = torch.randn(4099, generator=g).to(dtype)
        expected = segment_fingerprints(flat.numpy(), range_bounds(ranges))
        assert np.array_equal(torch_segment_fingerprints(flat.to(device), range_bounds(ranges)), expected), dtype

    import iteravg
    from iteravg.torch import Averager

    model = make_model(device)
    avg = Averager(model, started(iteravg.Schedule()), comm="local")
    train_steps(model, 2, avg.step)
    state = avg.engine.state
    spans = [(0, 10), (10, 85), (85, state.current(0).numel())]
    assert np.array_equal(state.tensor_fingerprints(0, spans),
                          segment_fingerprints(state.current(0).cpu().numpy(), range_bounds(spans)))


def test_snapshot_written_from_the_device_loads_on_the_host(device, tmp_path):
    """``save`` records the fingerprint computed where the state lives; ``load`` on a CPU model recomputes it with
    numpy from the file and must accept it, giving back the same bits."""
    import torch

    import iteravg
    from iteravg.torch import Averager

    model = make_model(device)
    avg = Averager(model, iteravg.EMASchedule(decay=0.9), comm="local")
    train_steps(model, 6, avg.step)
    assert avg.save(tmp_path / "ckpt", epoch=1) is not None
    host_model = make_model("cpu")
    twin = Averager(host_model, iteravg.EMASchedule(decay=0.9), comm="local")
    twin.load(tmp_path / "ckpt")
    ours, theirs = avg.averaged_state_dict(), twin.averaged_state_dict()
    assert twin.average_counter == avg.average_counter == 6
    assert all(torch.equal(ours[k].cpu(), theirs[k]) for k in ours)


def torchrun_worker(tmp_path: Path, *worker_args: str) -> list:
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    run([*launcher, "--standalone", "--nproc_per_node=2", WORKER, str(out), "--cuda", "--ckpt", str(ckpt),
         *worker_args], env={"ITERAVG_COLLECTIVE_TIMEOUT": "60"}, timeout=300)
    found = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    assert {r["comm"] for r in found} == {"torch"} and all(r["device"].startswith("cuda") for r in found), found
    assert len({r["averaged_sha"] for r in found}) == 1 and found[0]["averaged_sha"]
    assert len({r["final_model_sha"] for r in found}) == 1 and found[0]["counter"] > 0
    assert [r["snapshot"] is not None for r in found] == [True, False]
    return found


@pytest.mark.multirank
@pytest.mark.timeout(360)
def test_torchrun_nccl_two_gpus(tmp_path):
    if cuda_count() < 2:
        pytest.skip(f"needs 2 CUDA devices for an NCCL job, found {cuda_count()}")
    found = torchrun_worker(tmp_path, "--wrap", "ddp", "--schedule", "nta")
    assert {r["device"] for r in found} == {"cuda:0", "cuda:1"}


@pytest.mark.multirank
@pytest.mark.timeout(360)
def test_torchrun_two_ranks_sharing_one_gpu_over_gloo(tmp_path):
    """NCCL refuses two ranks on one GPU; Gloo moves the CUDA averaged buffers instead (the torch communicator
    hands them over as they are), so a one-GPU machine still runs the 2-rank CUDA path."""
    if cuda_count() < 1:
        pytest.skip("needs a CUDA device")
    torchrun_worker(tmp_path, "--wrap", "ddp", "--schedule", "ema", "--backend", "gloo")
