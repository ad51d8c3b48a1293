"""Runs a list of cells, one after the other, on one process or on every rank of an ``mpirun`` / ``torchrun`` job.

    python -m studies.averaging.worker JOB.json                       # one process
    mpirun -np 2 --bind-to none python -m studies.averaging.worker JOB.json   # 2 ranks, mx (ITERAVG_COMM=mpi)
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m studies.averaging.worker JOB.json
                                                                      # 2 ranks, torch (ITERAVG_COMM=torch)

Each family's ``launch`` says which (``families.py``). JOB.json holds the profile name, the output directory and
the cells (all of one data set, estimator and rank count). Every rank trains; rank 0 evaluates the trained
predictor with GluonTS's ``Evaluator`` on the data set's rolling test windows and writes ``<out>/cells/<key>.json``
atomically (temporary file, fsync, rename), then all ranks meet at a barrier before the next cell. On several
ranks, each rank first records the hash of its final network under ``<out>/ranks/<key>/`` and rank 0 records
whether they are all the same.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict

warnings.simplefilter("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from . import data as data_mod  # noqa: E402
from . import families  # noqa: E402
from .grid import PROFILES, Cell, settings_id, settings_of  # noqa: E402

METRICS = ("MASE", "RMSE", "mean_wQuantileLoss")


def evaluate(predictor: Any, test: Any, num_samples: int, seed: int, family: Any) -> Dict[str, Any]:
    """GluonTS's backtest: forecasts for every test window, then ``Evaluator``'s aggregate metrics."""
    from gluonts.evaluation import Evaluator, make_evaluation_predictions

    family.seed(10_000 + seed)  # sample paths (if any): the same stream for every method of a seed
    forecast_it, ts_it = make_evaluation_predictions(test, predictor=predictor, num_samples=num_samples)
    forecasts, series = list(forecast_it), list(ts_it)
    agg, _ = Evaluator(num_workers=0)(iter(series), iter(forecasts), num_series=len(series))
    metrics = {m: float(agg[m]) for m in METRICS}
    mean_forecast = np.stack([np.asarray(f.mean, dtype=np.float64) for f in forecasts])
    return {"metrics": metrics, "mean_forecast": np.round(mean_forecast, 6).tolist()}


def write_atomic(path: Path, record: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_cell(profile_name: str, cell: Cell, out: Path, family: Any, comm: Any) -> None:
    """Train the cell on every rank; rank 0 checks that the ranks ended with the same network, evaluates it and
    writes the result. Collective: every rank of the job calls it for the same cell."""
    from iteravg import collectives

    profile = PROFILES[profile_name]
    budget = profile.budget(cell)
    settings = settings_of(profile, cell)
    study_data = data_mod.load(cell.dataset)
    hashes = out / "ranks" / cell.key
    with tempfile.TemporaryDirectory(prefix=f"study-{cell.key}-r{comm.rank}-") as tmp:
        t0 = time.perf_counter()
        trained = family.train(cell, budget, study_data, Path(tmp))
        train_s = time.perf_counter() - t0
        if comm.size > 1:  # every rank's final network, compared by rank 0 (a shared filesystem: one host)
            write_atomic(hashes / f"rank{comm.rank}.json", {"final_sha256": trained.info["final_sha256"]})
            collectives.finish(comm)
        if comm.rank != 0:
            return
        record: Dict[str, Any] = {"key": cell.key, "cell": cell.__dict__, "profile": profile_name,
                                  "settings": settings, "settings_id": settings_id(settings),
                                  "train_seconds": round(train_s, 2), "info": trained.info,
                                  "versions": family.versions()}
        if comm.size > 1:
            finals = {json.loads((hashes / f"rank{r}.json").read_text())["final_sha256"] for r in range(comm.size)}
            record["info"]["ranks_identical"] = len(finals) == 1
        record.update(evaluate(trained.predictor, study_data.test, budget.num_samples, cell.seed, family))
        if trained.load_last_iterate is not None:
            trained.load_last_iterate()
            last = evaluate(trained.predictor, study_data.test, budget.num_samples, cell.seed, family)
            record["last_iterate"] = last
    write_atomic(out / "cells" / f"{cell.key}.json", record)


def main(argv: Any = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gluonts").setLevel(logging.ERROR)
    from iteravg import collectives
    from iteravg.comm import get_comm

    comm = get_comm()
    out = Path(job["out"])
    cells = [Cell(**c) for c in job["cells"]]
    fams: Dict[str, Any] = {}
    for i, cell in enumerate(cells):
        if cell.ranks != comm.size:
            raise SystemExit(f"cell {cell.key} wants {cell.ranks} ranks, this job has {comm.size}")
        fam = fams.setdefault(cell.family, families.family(cell.family, **job.get("family_args", {})))
        t0 = time.perf_counter()
        run_cell(job["profile"], cell, out, fam, comm)
        collectives.finish(comm)  # rank 0 has written the cell before any rank starts the next one
        if comm.rank == 0:
            print(f"[study] {i + 1}/{len(cells)} {cell.key} {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
