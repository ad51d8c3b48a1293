"""Post-hoc averaging windows in real 2-rank jobs (mpirun + mpi4py, and horovodrun for independent replicas, whose
post-hoc sums must move; numpy model, ``tests/multirank/worker_posthoc.py``).

The distributed average is the mean of the ranks' averages; so is the post-hoc one. Per rank the worker runs an NTA
job with ``posthoc=True`` and, for every start epoch, an ``AlphaSuffixSchedule`` job started there: every post-hoc
average equals that job's synced average (to float32 rounding), the one at NTA's own start equals NTA's average,
every rank holds the same bits, and a run stopped and resumed from its snapshots rebuilds the same bits. With
data-parallel replicas nothing moves and the post-hoc averages are bit for bit the single-process ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, mpirun, run  # noqa: E402
import worker_posthoc as W  # noqa: E402

import iteravg  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.filterwarnings("ignore")]


def close(got: dict, want: dict, rel: float) -> None:
    for k, v in want.items():
        g, w = np.array(got[k]), np.array(v)
        assert np.max(np.abs(g - w)) <= rel * np.max(np.abs(w)), k


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher,mode", [("mpirun", "independent"), ("mpirun", "data-parallel"),
                                           ("horovodrun", "independent")])
def test_posthoc_distributed(tmp_path, launcher, mode):
    args = ["tests/multirank/worker_posthoc.py", str(tmp_path), mode]
    if launcher == "mpirun":
        run(mpirun(2, args), env={"ITERAVG_COMM": "mpi"}, timeout=240)
    else:
        run(horovodrun(2, args), timeout=240)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    comm = "mpi" if launcher == "mpirun" else "horovod"
    assert [r["rank"] for r in ranks] == [0, 1] and {r["comm"] for r in ranks} == {comm}
    r0 = ranks[0]
    assert r0["trigger_epoch"] == 5 and [e for e, _ in r0["starts"]] == list(range(W.EPOCHS + 1))
    assert ranks[0]["posthoc_digests"] == ranks[1]["posthoc_digests"], "post-hoc averages differ across ranks"
    for e, k in r0["starts"]:
        ref = r0["reference"][str(e)]
        assert ref["counter"] == k, e
        close(r0["posthoc"][str(e)], ref["average"], 1e-5)
    close(r0["posthoc"][str(r0["trigger_epoch"])], r0["own"], 1e-5)  # NTA's start: NTA's own synced average
    assert r0["counter"] == dict(r0["starts"])[r0["trigger_epoch"]]
    for r in ranks:  # stopped after epoch 3, resumed from the snapshot: the same bits
        assert r["resumed_starts"] == r["starts"] and r["resumed_digests"] == r["posthoc_digests"]
    if mode == "data-parallel":  # identical replicas: nothing moved, the single-process post-hoc bits
        avg = iteravg.Averager(iteravg.NTASchedule(epochs=W.EPOCHS, n=1), comm="local", posthoc=True)
        W.train(avg, 0, False, range(W.EPOCHS))
        for e, _ in avg.posthoc_starts():
            assert W.digest(avg.posthoc_average(e)) == r0["posthoc_digests"][str(e)], e
