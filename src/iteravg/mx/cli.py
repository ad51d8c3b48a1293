"""``iteravg``: train with synchronised iterate averaging, and inspect checkpoints.

    iteravg train [--strategy nta|alpha-suffix|poly] [--epochs N] ... [--out RUN_DIR] [--resume]
    horovodrun -np 2 -H localhost:2 iteravg train          # distributed: same command under a launcher
    iteravg inspect RUN_DIR/checkpoints [--json]

Exit codes: 0 ok; 1 a checkpoint failed verification or training failed; 2 usage error;
3 stopped by ``ITERAVG_STOP_AFTER_EPOCH`` (a testing switch, after that epoch's checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3


# -- argument types ----------------------------------------------------------------------------------
def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def _float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = v != v or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi)
        if bad:
            lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lb}{lo}, {hi}{hb}, got {text}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="iteravg", description="Distributed model-iteration averaging.")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model with synchronised iterate averaging",
                       description="Data-parallel training (run it under horovodrun or mpirun for several ranks) "
                                   "with iteration averaging; rank 0 writes checkpoints, report and plot.")
    t.add_argument("--strategy", choices=["nta", "alpha-suffix", "poly"], default="nta",
                   help="nta: start when the validation loss stops improving; alpha-suffix: average the last "
                        "alpha share of epochs; poly: average every iterate from the first batch (default: nta)")
    t.add_argument("--epochs", type=_int_at_least(1), default=40)
    t.add_argument("--batch-size", type=_int_at_least(1), default=8)
    t.add_argument("--lr", type=_float_in(0, 10, lo_open=True), default=0.05, help="SGD learning rate")
    t.add_argument("--momentum", type=_float_in(0, 1, hi_open=True), default=0.9)
    t.add_argument("--seed", type=_int_at_least(0), default=0)
    t.add_argument("--hidden", type=_int_at_least(1), default=64, help="units of the MLP's two hidden layers")
    # Not "--n": horovodrun rejects it as an ambiguous abbreviation of its own options, even after the command.
    t.add_argument("--nta-n", "--n", dest="nta_n", type=int, default=5,
                   help="NTA non-monotone interval n (<= 0 disables the metric trigger); spell it --nta-n under "
                        "horovodrun, which takes --n for an abbreviation of its own options")
    t.add_argument("--last-n-trigger", action="store_true", help="NTA compares with the last n logs")
    t.add_argument("--maximize", action="store_true", help="NTA: the metric is to be maximised")
    t.add_argument("--alpha", type=_float_in(0, 1), default=0.75, help="alpha-suffix: share of epochs averaged")
    t.add_argument("--eta", type=_float_in(-1, float("inf"), lo_open=True), default=0.0,
                   help="polynomial-decay parameter, alpha_k = (eta+1)/(eta+k)")
    t.add_argument("--fallback-alpha", type=_float_in(0, 1), default=0.05,
                   help="NTA: averaging starts at epoch epochs*(1-fallback_alpha) at the latest")
    t.add_argument("--data", help="CSV file (header; numeric columns; column 'target' or the last is the target)")
    t.add_argument("--out", help="run directory (default runs/<timestamp>)")
    t.add_argument("--checkpoint-dir", help="default <out>/checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint directory's latest snapshot")
    t.add_argument("--comm", choices=["auto", "horovod", "mpi", "local"], default="auto")
    t.add_argument("--sync", choices=["mean", "broadcast"], default="mean",
                   help="how averaged models are made identical across ranks")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("inspect", help="print and verify a checkpoint")
    i.add_argument("checkpoint_dir")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    ap.set_defaults(train_parser=t)
    return ap


# -- train ---------------------------------------------------------------------------------------------
def _make_net(num_features: int, hidden: int, seed: int):
    import mxnet as mx
    from mxnet.gluon import nn

    mx.random.seed(seed)
    net = nn.HybridSequential(prefix="mlp_")
    with net.name_scope():
        net.add(nn.Dense(hidden, activation="relu", in_units=num_features),
                nn.Dense(hidden, activation="relu", in_units=hidden), nn.Dense(1, in_units=hidden))
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    net(mx.nd.zeros((1, num_features)))
    return net


def _strategy(args: argparse.Namespace):
    import iteravg.mx as im

    common = dict(comm=None if args.comm == "auto" else args.comm, sync=args.sync)
    if args.strategy == "nta":
        return im.NTA(epochs=args.epochs, n=args.nta_n, maximize=args.maximize, last_n_trigger=args.last_n_trigger,
                      eta=args.eta, fallback_alpha=args.fallback_alpha, **common)
    if args.strategy == "alpha-suffix":
        return im.Alpha_Suffix(epochs=args.epochs, alpha=args.alpha, eta=args.eta, **common)
    poly = im.IterationAveragingStrategy(eta=args.eta, **common)  # averages every iterate, from the first batch
    poly.schedule._start(0)
    return poly


def train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import mxnet as mx

    import iteravg.mx as im
    from iteravg import __version__, collectives
    from iteravg.mx import data, report
    from iteravg.checkpoint import latest_epoch, resolve_snapshot
    from iteravg.mx.checkpoint import fingerprint_hex
    from iteravg.mx.train import StoppedEarly, evaluate, finish_training, fit
    from iteravg.mx.train.loop import stop_after_epoch

    try:
        strategy = _strategy(args)
    except ValueError as exc:
        parser.error(str(exc))
    comm = strategy.comm
    rank0 = comm.rank == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(message)s")
    log = logging.getLogger("iteravg")

    # Paths: rank 0 decides (timestamps differ across ranks) and checks --resume; everybody agrees.
    def plan() -> Dict[str, str]:
        out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoints"
        if args.resume:
            resolve_snapshot(ckpt)  # raises if there is nothing to resume from
        else:
            previous = latest_epoch(ckpt)
            if previous is not None:
                log.warning("iteravg: %s already holds a checkpoint (epoch %d); this fresh run replaces it "
                            "(use --resume to continue it instead)", ckpt, previous)
        out.mkdir(parents=True, exist_ok=True)
        return {"out": str(out), "ckpt": str(ckpt)}

    def load_data() -> Any:
        stop_after_epoch()  # the testing switch, checked early (usage error if malformed)
        return data.load(args.data)

    try:
        paths = collectives.broadcast_json(comm, collectives.run_on_root(comm, plan, "preparing the run directory"))
        ds, error = None, None
        try:  # every rank loads the data; a failure on any rank (e.g. a file only some hosts see) fails all
            ds = load_data()
        except ValueError as exc:
            error = exc
        collectives.agree(comm, error, "loading the data")
    except ValueError as exc:
        if rank0:  # the error is agreed: every rank has it, rank 0 reports it
            parser.print_usage(sys.stderr)
            print(f"iteravg train: error: {exc}", file=sys.stderr)
        collectives.finish(comm)
        return EXIT_USAGE
    per_rank = len(ds.train[1]) // comm.size
    if args.batch_size > per_rank:
        if rank0:
            parser.print_usage(sys.stderr)
        print(f"iteravg train: error: --batch-size {args.batch_size} is larger than each rank's share of the "
              f"training data ({per_rank} samples on {comm.size} rank(s))", file=sys.stderr)
        collectives.finish(comm)
        return EXIT_USAGE
    out, ckpt = Path(paths["out"]), Path(paths["ckpt"])
    net = _make_net(ds.num_features, args.hidden, args.seed)
    loss_fn = mx.gluon.loss.L2Loss()  # 0.5 * squared error
    callback = im.ModelIterationAveraging(strategy, checkpoint_dir=ckpt, resume=args.resume)
    if rank0:
        log.info("iteravg %s: %s on %d rank(s) (%s), data %s: %d train / %d val / %d test", __version__,
                 args.strategy, comm.size, comm.name, ds.name, len(ds.train[1]), len(ds.val[1]), len(ds.test[1]))
    bar = _progress(args, rank0)

    def on_epoch(row: Dict[str, float]) -> None:
        if rank0 and (bar is None or bar.disable) and (row["epoch"] % 10 == 0 or row["epoch"] == strategy.schedule.trigger_epoch):
            log.info("epoch %d: train loss %.4f, validation loss %.4f%s", row["epoch"], row["train_loss"],
                     row.get("val_loss", float("nan")), ", averaging" if strategy.averaging_started else "")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{row.get('val_loss', float('nan')):.4f}",
                            averaging=strategy.averaging_started, refresh=False)

    try:
        result = fit(net, loss_fn, ds.train, ds.val, comm=comm, callbacks=[callback], epochs=args.epochs,
                     batch_size=args.batch_size, learning_rate=args.lr, momentum=args.momentum, seed=args.seed,
                     resume_from=ckpt if args.resume else None, on_epoch=on_epoch)
    except StoppedEarly as exc:
        if bar is not None:
            bar.close()
        if rank0:
            log.info("%s", exc)
        collectives.finish(comm)
        return EXIT_STOPPED
    except ValueError as exc:  # e.g. a resumed checkpoint that does not fit; raised identically on every rank
        if bar is not None:
            bar.close()
        if rank0:
            print(f"iteravg train: error: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    if bar is not None:
        bar.update(args.epochs - bar.n)
        bar.close()

    def mse(sum_count: tuple) -> float:
        return 2.0 * sum_count[0] / sum_count[1]  # L2Loss is half the squared error

    last = {"test_mse": mse(evaluate(net, loss_fn, ds.test)), "val_mse": mse(evaluate(net, loss_fn, ds.val))}
    finish_training(net, [callback])  # loads the averaged model (synced) into net; final checkpoint
    averaged = None
    if strategy.averaged_model is not None:
        averaged = {"test_mse": mse(evaluate(net, loss_fn, ds.test)), "val_mse": mse(evaluate(net, loss_fn, ds.val))}
    fp = None
    if strategy.averaged_state is not None and strategy.average_counter:
        fp = fingerprint_hex(strategy.averaged_state.fingerprint())
    if rank0:
        metrics = {"last iterate": last}
        if averaged is not None:
            metrics["averaged"] = averaged
        rep = {
            "iteravg_version": __version__, "config": {k: v for k, v in vars(args).items() if k not in ("command", "train_parser")},
            "data": ds.name, "world_size": comm.size, "comm": comm.name, "epochs_done": result.epochs_done,
            "resumed_from_epoch": result.resumed_from, "history": result.history,
            "trigger_epoch": strategy.schedule.trigger_epoch, "average_counter": strategy.average_counter,
            "metrics": metrics, "fingerprint": fp, "checkpoint_dir": str(ckpt),
        }
        report.write_report(out, rep)
        report.plot_losses(out, result.history, strategy.schedule.trigger_epoch,
                           f"{ds.name}: {args.strategy}, {comm.size} rank(s)")
        print(report.table(metrics))
        print(f"run directory: {out}  (report.json, val_loss.png, checkpoints)")
    collectives.finish(comm)
    return 0


def _progress(args: argparse.Namespace, rank0: bool) -> Optional[Any]:
    if args.no_progress or not rank0:
        return None
    from tqdm import tqdm  # noqa: WPS433

    return tqdm(total=args.epochs, desc="epochs", unit="ep", file=sys.stderr, leave=False, disable=None)


# -- inspect -------------------------------------------------------------------------------------------
def inspect(args: argparse.Namespace) -> int:
    from iteravg.checkpoint import PARAMS_FILE, CheckpointError, read_snapshot
    from iteravg.core.averaged import Layout, TensorSpec, fingerprint
    from iteravg.mx.checkpoint import fingerprint_hex, load_params_file

    problems: List[str] = []
    try:
        snap, state = read_snapshot(args.checkpoint_dir)  # verifies every file's SHA-256
    except CheckpointError as exc:
        print(f"iteravg inspect: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    strat = state.get("strategy", {})
    summary: Dict[str, Any] = {
        "snapshot": str(snap), "epoch": state.get("epoch"), "stage": state.get("stage"),
        "world_size": state.get("world_size"), "comm": state.get("comm"), "format_version": state.get("format_version"),
        "strategy": strat.get("kind"), "averaging_started": strat.get("averaging_started"),
        "trigger_epoch": strat.get("trigger_epoch"), "average_counter": strat.get("average_counter"),
        "fingerprint": state.get("fingerprint"), "files": sorted(state.get("files", {})),
    }
    layout_desc = state.get("layout") or []
    summary["tensors"] = len(layout_desc)
    summary["parameters"] = int(sum(int(_prod(s[1])) for s in layout_desc))
    summary["parameter_bytes"] = int(sum(int(_prod(s[1])) * _itemsize(s[2]) for s in layout_desc))
    if state.get("has_average"):
        try:
            layout = Layout(tuple(TensorSpec(n, tuple(shape), dt) for n, shape, dt in layout_desc))
            groups = load_params_file(snap / PARAMS_FILE, layout, state.get("structural_names", {}))
            actual = fingerprint_hex(fingerprint(groups))
            if actual != state.get("fingerprint"):
                problems.append(f"averaged.params fingerprint {actual} != recorded {state.get('fingerprint')}")
        except (CheckpointError, ValueError) as exc:
            problems.append(str(exc))
    summary["verified"] = not problems
    if args.json:
        print(json.dumps(dict(summary, problems=problems), indent=1))
    else:
        for key, value in summary.items():
            print(f"{key:>18}: {value}")
        for p in problems:
            print(f"PROBLEM: {p}", file=sys.stderr)
    return 0 if not problems else EXIT_VERIFY_FAILED


def _itemsize(dtype: str) -> int:
    import numpy as np

    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        return 0


def _prod(shape: List[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        return train(args, args.train_parser)
    return inspect(args)


if __name__ == "__main__":
    sys.exit(main())
