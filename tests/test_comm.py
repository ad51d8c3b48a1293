"""Communicator choice from the launcher's environment, and the single-process fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iteravg.comm import LocalComm, detect_backend, resolve_comm

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import mpirun, run  # noqa: E402


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, "local"),
        ({"HOROVOD_RANK": "0", "HOROVOD_HOSTNAME": "localhost"}, "horovod"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "horovod"),  # plain mpirun: Horovod is built here
        ({"OMPI_COMM_WORLD_SIZE": "2", "ITERAVG_COMM": "mpi"}, "mpi"),
        ({"HOROVOD_RANK": "0", "ITERAVG_COMM": "local"}, "local"),
        ({"ITERAVG_COMM": " Horovod "}, "horovod"),
    ],
)
def test_detect_backend(monkeypatch, env, expected):
    for k in ("ITERAVG_COMM", "HOROVOD_RANK", "HOROVOD_HOSTNAME", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert detect_backend() == expected


def test_bad_choices_name_the_argument(monkeypatch):
    monkeypatch.setenv("ITERAVG_COMM", "nccl")
    with pytest.raises(ValueError, match="ITERAVG_COMM"):
        detect_backend()
    with pytest.raises(ValueError, match="comm"):
        resolve_comm("bogus")
    with pytest.raises(ValueError, match="comm"):
        resolve_comm(42)


def test_single_process_needs_no_launcher_mpi_or_horovod():
    code = ("import sys, iteravg.mx as m; s = m.NTA(epochs=3); "
            "print(s.comm.name, s.comm.size, 'horovod' in sys.modules, 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["local", "1", "False", "False"]
    assert isinstance(resolve_comm("local"), LocalComm)


@pytest.mark.multirank
def test_plain_mpirun_picks_horovod_when_built(tmp_path):
    run(mpirun(2, ["tests/multirank/worker_sync.py", str(tmp_path)]), timeout=180)
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["comm"] for i in infos] == ["horovod", "horovod"] and infos[0]["size"] == 2


# -- the fingerprint that checks ranks hold the same bits -------------------------------------------
FP_CODE = ("import numpy as np; from iteravg.core.averaged import fingerprint; from iteravg.core import _kernel as k; "
           "rng = np.random.default_rng(5); a = rng.standard_normal(100003).astype(np.float32); "
           "h = rng.standard_normal(77).astype(np.float16); d = rng.standard_normal(9); "
           "b = a.copy(); s = k.scale_and_word_sums(b, 1 / 3); "
           "print(k.KERNELS is not None, *fingerprint([a, h, d]), *fingerprint([b], [s]), __import__('hashlib').sha256(b.tobytes()).hexdigest())")


def test_fingerprint_is_the_same_with_and_without_the_c_kernel():
    from iteravg.core import _kernel

    assert _kernel.KERNELS is not None, "the C kernel should be built in this environment"
    with_k = subprocess.run([sys.executable, "-c", FP_CODE], capture_output=True, text=True, timeout=120, check=True)
    without = subprocess.run([sys.executable, "-c", FP_CODE], capture_output=True, text=True, timeout=120, check=True,
                             env=dict(__import__("os").environ, ITERAVG_NO_KERNEL="1"))
    a, b = with_k.stdout.split(), without.stdout.split()
    assert (a[0], b[0]) == ("True", "False")
    assert a[1:] == b[1:]


def test_fingerprint_sees_every_bit_and_every_position():
    import numpy as np

    from iteravg.core.averaged import fingerprint

    rng = np.random.default_rng(0)
    big = rng.standard_normal(4099).astype(np.float32)
    base = fingerprint([big]).tobytes()
    swapped = big.copy()
    swapped[[10, 3001]] = swapped[[3001, 10]]  # a permutation inside the buffer: same multiset of words
    assert fingerprint([swapped]).tobytes() != base
    pair = big.copy()
    pair[[0, 1]] = pair[[1, 0]]  # the two halves of one 8-byte word
    assert fingerprint([pair]).tobytes() != base
    assert fingerprint([big[:2049], big[2049:]]).tobytes() != fingerprint([big[2049:], big[:2049]]).tobytes()
    small = rng.standard_normal(7).astype(np.float16)  # 14 bytes: one word and a 6-byte tail
    seen = {fingerprint([small]).tobytes()}
    raw = small.view(np.uint8)
    for byte in range(raw.size):
        for bit in range(8):
            flipped = raw.copy()
            flipped[byte] ^= 1 << bit
            seen.add(fingerprint([flipped.view(np.float16)]).tobytes())
    assert len(seen) == 1 + 8 * raw.size, "some single-bit flip left the fingerprint unchanged"
