"""Multi-rank worker for the model zoo: trains every model of the multi-rank subset (tests/zoo/models.py) on each
rank with that rank's own data, through iteravg's callback with validation swaps, and dumps what each rank ended
with. Launched once per launcher by tests/zoo/test_zoo_multirank.py.

Args: OUT_DIR. Writes OUT_DIR/rank{r}.npz (per case ``<case>/avg``, ``<case>/net``: the averaged model and the
final network as raw bytes; ``<case>/training``: the rank's own training weights before ``on_train_end``) and
OUT_DIR/rank{r}.json (comm name, per-case counter or error). A case that raises is recorded and the next runs.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the zoo package

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

import iteravg.mx as ours  # noqa: E402
from iteravg import collectives  # noqa: E402
from zoo.models import BY_NAME, cases, infer, make_trainer, step, weights  # noqa: E402

EPOCHS, BATCHES = 3, 3


def raw(arrays) -> np.ndarray:
    return np.frombuffer(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays), dtype=np.uint8)


def run_case(name: str, dtype: str, index: int, rank: int, out: Dict[str, np.ndarray]) -> dict:
    model = BY_NAME[name]
    built = model.build(dtype)
    built.net.hybridize()
    trainer = make_trainer(built)
    strategy = ours.Alpha_Suffix(epochs=EPOCHS, alpha=0.75, eta=0.5)
    cb = ours.ModelIterationAveraging(avg_strategy=strategy)
    rng = np.random.default_rng([rank, index])  # each rank trains on its own data
    val = built.batch(np.random.default_rng(index))
    cb.on_network_initializing_end(training_network=built.net)
    for epoch in range(EPOCHS):
        for b in range(BATCHES):
            step(model, dtype, built, trainer, 1000 * rank + 10 * epoch + b, built.batch(rng))
            cb.on_train_batch_end(training_network=built.net)
        cb.on_validation_epoch_start(training_network=built.net)
        infer(built, val, recording=True)  # oneDNN may reorder Conv weights here
        cb.on_validation_epoch_end(epoch_no=epoch, epoch_loss=1.0, training_network=built.net, trainer=None)
        cb.on_epoch_end(epoch_no=epoch, epoch_loss=1.0 + rank, training_network=built.net, trainer=None,
                        best_epoch_info={}, ctx=mx.cpu())
    case = f"{name}-{dtype}"
    out[f"{case}/training"] = raw(weights(built.net))
    cb.on_train_end(training_network=built.net, temporary_dir=None)
    out[f"{case}/avg"] = raw(v.asnumpy() for v in strategy.averaged_model.values())
    out[f"{case}/net"] = raw(weights(built.net))
    return dict(counter=strategy.average_counter, names=list(built.net.collect_params().keys()))


def main() -> int:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    comm = ours.IterationAveragingStrategy().comm
    rank = comm.rank
    arrays: Dict[str, np.ndarray] = {}
    report = dict(rank=rank, size=comm.size, comm=comm.name, cases={})
    # Rank 1 builds every model once more first, so Gluon's process-wide block counter gives its networks other
    # auto names ("_shared1_dense0_weight" vs "_shared0_..."): the cross-rank layout check must use structure.
    if rank == 1:
        for name, dtype in cases(multirank_only=True):
            BY_NAME[name].build(dtype)
    for index, (name, dtype) in enumerate(cases(multirank_only=True)):
        try:
            report["cases"][f"{name}-{dtype}"] = run_case(name, dtype, index, rank, arrays)
        except Exception as exc:  # noqa: BLE001 -- recorded per case for the test to report
            traceback.print_exc()
            report["cases"][f"{name}-{dtype}"] = dict(error=f"{type(exc).__name__}: {exc}"[:2000])
    np.savez(out_dir / f"rank{rank}.npz", **arrays)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    collectives.finish(comm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
