"""`iteravg train`, plus one line of evidence per rank: the SHA-256 of the averaged model each rank ends with.

The CLI writes files on rank 0 only; to show that every host ends with the same averaged model bytes, this
wrapper runs the CLI's own ``main`` unchanged and wraps ``iteravg.mx.train.finish_training`` (which loads the
synced averaged model into the network on every rank) to hash the network's parameters afterwards. Each rank
writes OUT/rank{r}.json on its own host (OUT from --out) and prints a RANKHASH line.

Usage: exactly as `iteravg train ARGS...`, e.g. under horovodrun: python train_hash.py --epochs 6 --out /runs/x
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
from pathlib import Path
from typing import Any, List

import numpy as np

import iteravg.mx.train as train_pkg
from iteravg.mx.cli import main as cli_main

_finish_training = train_pkg.finish_training


def _out_dir(argv: List[str]) -> Path:
    for i, arg in enumerate(argv):
        if arg == "--out":
            return Path(argv[i + 1])
        if arg.startswith("--out="):
            return Path(arg.split("=", 1)[1])
    raise SystemExit("train_hash.py needs --out (each rank writes its hash there)")


def _finish_and_hash(net: Any, callbacks: List[Any], *a: Any, **kw: Any) -> Any:
    result = _finish_training(net, callbacks, *a, **kw)
    strategy = callbacks[0].avg_strategy
    h = hashlib.sha256()
    for name, p in net.collect_params().items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(p.data().asnumpy()).view(np.uint8).tobytes())
    record = {"host": socket.gethostname(), "rank": strategy.comm.rank, "size": strategy.comm.size,
              "sha256": h.hexdigest(), "average_counter": strategy.average_counter}
    out = _out_dir(sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{strategy.comm.rank}.json").write_text(json.dumps(record))
    print(f"RANKHASH {json.dumps(record)}", flush=True)
    return result


if __name__ == "__main__":
    train_pkg.finish_training = _finish_and_hash  # the CLI imports it from the package at call time
    sys.exit(cli_main(["train", *sys.argv[1:]]))
