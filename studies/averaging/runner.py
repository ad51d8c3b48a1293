"""Launch workers for the cells that have no valid cached result yet.

A cached result is ``<out>/cells/<key>.json`` computed with the same settings (``settings_id``). The missing
cells are grouped by (data set, family, estimator, ranks): each group runs in one worker process (1 process) or
one ``mpirun`` job (several ranks), so start-up is paid once per group. Single-process groups may run ``jobs`` at
a time, split into chunks; multi-rank jobs run alone (they use every core). Every launch has a timeout; a failed
worker stops the study with its output, and the cells it finished stay cached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .families import family
from .grid import Cell, Profile, settings_id, settings_of

REPO = Path(__file__).resolve().parents[2]


def cached(profile: Profile, cell: Cell, out: Path) -> Optional[dict]:
    """The cell's result if present, readable and computed with the current settings; else ``None``."""
    path = out / "cells" / f"{cell.key}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("settings_id") != settings_id(settings_of(profile, cell)):
        return None
    return record


def missing(profile: Profile, cells: Sequence[Cell], out: Path) -> List[Cell]:
    return [c for c in cells if cached(profile, c, out) is None]


def job_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), src, env.get("PYTHONPATH", "")) if p)
    for key in ("ITERAVG_COMM", "ITERAVG_FAULT", "HOROVOD_RANK", "OMPI_COMM_WORLD_SIZE"):
        env.pop(key, None)
    env.update(extra)
    return env


def plan(cells: Sequence[Cell], jobs: int) -> List[List[Cell]]:
    """Batches of cells, one worker each: groups in order, single-process groups split into ``jobs`` chunks."""
    groups: "OrderedDict[Tuple, List[Cell]]" = OrderedDict()
    for c in cells:
        groups.setdefault(c.group, []).append(c)
    batches = []
    for group, members in groups.items():
        n = jobs if group[3] == 1 else 1
        n = max(1, min(n, len(members)))
        batches.extend([members[i::n] for i in range(n)])
    return [b for b in batches if b]


def run(profile: Profile, cells: Sequence[Cell], out: Path, *, jobs: int = 2, comm: str = "mpi",
        seconds_per_cell: float = 600.0, log=print) -> int:
    """Compute every cell of ``cells`` not cached in ``out``. Returns how many cells were computed."""
    todo = missing(profile, cells, out)
    log(f"[study] {len(cells) - len(todo)} of {len(cells)} cells cached in {out}/cells; {len(todo)} to run")
    if not todo:
        return 0
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    batches = plan(todo, jobs)
    running: List[Tuple[subprocess.Popen, List[Cell], Path, float, float]] = []
    t_start = time.perf_counter()

    def stop_all() -> None:
        for proc, *_ in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def poll() -> None:
        """Drop finished workers; on a failure or a timeout, stop the others and raise with the worker's log."""
        for item in list(running):
            proc, batch, log_path, started, timeout = item
            elapsed = time.perf_counter() - started
            if proc.poll() is None and elapsed <= timeout:
                continue
            running.remove(item)
            if proc.poll() is None or proc.returncode != 0:
                why = f"ran past {timeout:.0f} s" if proc.poll() is None else f"exited {proc.returncode}"
                running.append(item)
                stop_all()
                raise RuntimeError(f"[study] worker for {batch[0].group} {why}; log {log_path}:\n"
                                   f"{log_path.read_text()[-4000:]}")
            log(f"[study] done {len(batch)} cells of {batch[0].group} in {elapsed:.0f} s "
                f"(study elapsed {time.perf_counter() - t_start:.0f} s)")

    def busy(ranks: int) -> bool:
        """Whether a batch on ``ranks`` ranks must wait: several ranks run alone, one process up to ``jobs``."""
        if not running:
            return False
        return ranks > 1 or len(running) >= jobs or any(b[0].ranks > 1 for _, b, *_ in running)

    try:
        for n, batch in enumerate(batches):
            ranks = batch[0].ranks
            while busy(ranks):
                time.sleep(0.5)
                poll()
            first = batch[0]
            name = f"{first.dataset}-{first.family}.{first.estimator}-np{ranks}-{n:03d}"
            job_path = out / "jobs" / f"{name}.json"
            job_path.write_text(json.dumps({"profile": profile.name, "out": str(out.resolve()),
                                            "cells": [asdict(c) for c in batch]}))
            cmd, extra = family(first.family, comm=comm).launch(ranks, ["-m", "studies.averaging.worker",
                                                                        str(job_path)])
            log_path = out / "logs" / f"{name}.log"
            with open(log_path, "w") as log_file:
                proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(extra), stdout=log_file,
                                        stderr=subprocess.STDOUT)
            log(f"[study] started {len(batch)} cells of {first.group} (log {log_path})")
            running.append((proc, batch, log_path, time.perf_counter(), 120.0 + seconds_per_cell * len(batch)))
        while running:
            time.sleep(0.5)
            poll()
    except BaseException:
        stop_all()
        raise
    return len(todo)
