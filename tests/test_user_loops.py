"""A Horovod user's own MXNet loop (hvd.DistributedTrainer, hand-called hooks) with iteravg's callback, on a model
oneDNN and LSTM make hard: under horovodrun (MPI and Gloo) every rank ends with the same trained and averaged bits,
with validation on every rank (GluonTS's hook order) or on rank 0 only (``averaged_weights(net, sync=False)``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, run  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.filterwarnings("ignore")]
WORKER = "tests/multirank/worker_hvd_user.py"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("gloo,extra", [(False, []), (True, ["--rank0-validation"])], ids=["mpi-all-validate",
                                                                                         "gloo-rank0-validates"])
def test_horovod_users_own_loop(tmp_path, gloo, extra):
    run(horovodrun(2, [WORKER, str(tmp_path), *extra], gloo=gloo), timeout=240,
        env={"ITERAVG_COLLECTIVE_TIMEOUT": "60"})
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["last"] == ranks[1]["last"], "data-parallel replicas diverged (trainable parameters)"
    assert ranks[0]["final"] == ranks[1]["final"], "averaged networks differ across ranks"
    assert ranks[0]["final_trainable"] != ranks[0]["last"], "train end did not load the average"
    assert all(r["started"] and r["counter"] > 1 for r in ranks)
    assert ranks[0]["trigger"] == ranks[1]["trigger"]
    if extra:
        assert len(ranks[0]["val"]) == 5 and ranks[1]["val"] == []
