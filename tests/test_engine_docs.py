"""docs/engine.md is executable: its ``python`` blocks, in order, form one script that runs on one process and under
``mpirun -np 2`` (mpi4py, no framework imported), ending with bitwise-identical averages on every rank; its
excerpt of ``examples/torch_averaging.py`` is verbatim."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import REPO, job_env, mpirun  # noqa: E402

DOC = REPO / "docs" / "engine.md"
BLOCK = re.compile(r"(<!-- excerpt: (?P<src>[\w./-]+) -->\n)?```python\n(?P<code>.*?)```", re.S)

# Appended to the doc's script: what each rank ends with, for the test to compare across ranks.
TRAILER = '''
import hashlib, json, sys
_avg = avg.averaged()
json.dump({"rank": avg.comm.rank, "comm": avg.comm.name, "counter": avg.average_counter,
           "averaged": hashlib.sha256(b"".join(_avg[k].tobytes() for k in sorted(_avg))).hexdigest(),
           "params": hashlib.sha256(b"".join(params[k].tobytes() for k in sorted(params))).hexdigest(),
           "frameworks": sorted(m for m in ("mxnet", "torch", "horovod") if m in sys.modules)},
          open(f"rank-{avg.comm.rank}.json", "w"))
'''


def blocks() -> tuple:
    runnable, excerpts = [], []
    for m in BLOCK.finditer(DOC.read_text()):
        (excerpts.append((m["src"], m["code"])) if m["src"] else runnable.append(m["code"]))
    return runnable, excerpts


def script(tmp_path: Path) -> Path:
    runnable, _ = blocks()
    assert len(runnable) >= 5, "docs/engine.md lost its runnable blocks"
    path = tmp_path / "engine_doc.py"
    path.write_text("\n".join(runnable) + TRAILER)
    return path


def results(tmp_path: Path, size: int) -> list:
    found = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(size)]
    assert len({r["averaged"] for r in found}) == 1, "averaged models differ across ranks"
    assert all(r["params"] == r["averaged"] for r in found), "finalize did not load the average"
    assert all(r["counter"] == 19 and r["frameworks"] == [] for r in found), found
    return found


def run_in(tmp_path: Path, cmd: list, env: dict) -> subprocess.CompletedProcess:
    """Run with the script's directory as cwd (the doc writes ``ckpt/`` relative to it), always with a timeout."""
    proc = subprocess.run(cmd, cwd=tmp_path, env=job_env(env), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_doc_script_runs_on_one_process(tmp_path):
    proc = run_in(tmp_path, [sys.executable, str(script(tmp_path))], {})
    assert "averaged model's loss on rank 0:" in proc.stdout
    assert "resuming with epochs=16; the checkpoint was written with epochs=8" in proc.stderr  # the resume rule
    assert results(tmp_path, 1)[0]["comm"] == "local"
    assert (tmp_path / "ckpt" / "latest" / "averaged.safetensors").is_file()


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_doc_script_runs_under_mpirun(tmp_path):
    proc = run_in(tmp_path, mpirun(2, [str(script(tmp_path))]), {"ITERAVG_COMM": "mpi"})
    assert {r["comm"] for r in results(tmp_path, 2)} == {"mpi"}
    assert proc.stdout.count("averaged model's loss on rank 0:") == 1, "only rank 0 evaluates"
    assert proc.stderr.count("resuming with epochs=16") == 1, "the resume rule is warned about once, by rank 0"


def test_excerpts_are_verbatim():
    """Every line of an excerpt block appears in its source file (indentation aside), so the doc cannot drift
    from the example that the tests run."""
    _, excerpts = blocks()
    assert excerpts, "docs/engine.md lost its example excerpt"
    for src, code in excerpts:
        source = {line.strip() for line in (REPO / src).read_text().splitlines()}
        missing = [line for line in code.splitlines() if line.strip() and line.strip() not in source]
        assert not missing, f"not in {src}: {missing}"
