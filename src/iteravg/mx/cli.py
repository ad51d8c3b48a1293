"""``iteravg``: train with synchronised iterate averaging, and inspect checkpoints.

    iteravg train [--strategy nta|alpha-suffix|poly] [--epochs N] ... [--out RUN_DIR] [--resume]
    horovodrun -np 2 -H localhost:2 iteravg train          # distributed: same command under a launcher
    iteravg inspect RUN_DIR [--json]                       # or RUN_DIR/checkpoints, or one snapshot directory
    iteravg posthoc RUN_DIR [--json] [--export START OUT]  # a --posthoc run: every averaging start, evaluated

Exit codes: 0 ok; 1 a checkpoint failed verification or training failed; 2 usage error;
3 stopped by ``ITERAVG_STOP_AFTER_EPOCH`` (a testing switch, after that epoch's checkpoint).

A usage error is one line on stderr (``iteravg train: error: ...``), printed by rank 0 only: under a
launcher every rank parses the same arguments, so the rank is read from the launcher's environment
(``HOROVOD_RANK``, ``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``, ...) before any communicator exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

from iteravg.comm import launcher_rank

EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3

class UsageError(ValueError):
    """A problem with the command line or its inputs: one line, exit code 2."""


def usage_error(prog: str, message: str) -> int:
    """Print ``prog: error: message`` as one line, on rank 0 only; return the usage exit code."""
    if launcher_rank() == 0:
        one_line = " ".join(str(message).split())
        print(f"{prog}: error: {one_line}", file=sys.stderr, flush=True)
    return EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to ``--help``), printed once under a launcher."""

    def error(self, message: str) -> NoReturn:
        usage_error(self.prog, f"{message} (see '{self.prog} --help')")
        sys.exit(EXIT_USAGE)

    def print_help(self, file: Any = None) -> None:  # --help under a launcher: once, too
        if launcher_rank() == 0:
            super().print_help(file)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options with a real default (not for flags or "unset")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


# -- argument types ----------------------------------------------------------------------------------
def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def _int_any(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = v != v or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi)
        if bad:
            raise argparse.ArgumentTypeError(f"must be in {_interval(lo, hi, lo_open, hi_open)}, got {text}")
        return v

    return parse


def _interval(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> str:
    def show(v: float) -> str:
        return "inf" if v == float("inf") else f"{v:g}"

    return f"{'(' if lo_open else '['}{show(lo)}, {show(hi)}{')' if hi_open else ']'}"


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="iteravg", description="Distributed model-iteration averaging.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{train,inspect,posthoc}")
    t = sub.add_parser("train", help="train a model with synchronised iterate averaging", formatter_class=_HelpFormatter,
                       description="Data-parallel training (run it under horovodrun or mpirun for several ranks) "
                                   "with iteration averaging; rank 0 writes checkpoints, report.json, val_loss.png "
                                   "and val_loss.csv into the run directory and prints the held-out MSE (on "
                                   "standardised targets) of the last iterate and of the averaged model.")
    t.add_argument("--strategy", choices=["nta", "alpha-suffix", "poly"], default="nta",
                   help="nta: start when the validation loss stops improving; alpha-suffix: average the last "
                        "alpha share of epochs; poly: average every iterate from the first batch")
    t.add_argument("--epochs", type=_int_at_least(1), default=40, help="epochs to train in total (>= 1)")
    t.add_argument("--batch-size", type=_int_at_least(1), default=8,
                   help="per rank; at most each rank's share of the training rows")
    t.add_argument("--lr", type=_float_in(0, 10, lo_open=True), default=0.05, help="SGD learning rate, in (0, 10]")
    t.add_argument("--momentum", type=_float_in(0, 1, hi_open=True), default=0.9, help="SGD momentum, in [0, 1)")
    t.add_argument("--seed", type=_int_at_least(0), default=0, help="initialisation and batch order (>= 0)")
    t.add_argument("--hidden", type=_int_at_least(1), default=64, help="units of the MLP's two hidden layers")
    # Not "--n": horovodrun rejects it as an ambiguous abbreviation of its own options, even after the command.
    t.add_argument("--nta-n", "--n", dest="nta_n", type=_int_any, default=5,
                   help="NTA non-monotone interval n (<= 0 disables the metric trigger); spell it --nta-n under "
                        "horovodrun, which takes --n for an abbreviation of its own options")
    t.add_argument("--last-n-trigger", action="store_true", help="NTA compares with the last n logs")
    t.add_argument("--maximize", action="store_true", help="NTA: the metric is to be maximised")
    t.add_argument("--alpha", type=_float_in(0, 1), default=0.75,
                   help="alpha-suffix: share of epochs averaged, in [0, 1]")
    t.add_argument("--eta", type=_float_in(-1, float("inf"), lo_open=True, hi_open=True), default=0.0,
                   help="polynomial-decay parameter, alpha_k = (eta+1)/(eta+k), in (-1, inf) (finite)")
    t.add_argument("--fallback-alpha", type=_float_in(0, 1), default=0.05,
                   help="NTA: averaging starts after epoch epochs*(1-fallback_alpha) at the latest, in [0, 1]")
    t.add_argument("--data", help="CSV file: a header row, numeric comma-separated columns; column 'target' "
                                  "(else the last) is the target (default: the bundled diabetes data)")
    t.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    t.add_argument("--checkpoint-dir", help="checkpoint directory (default: <out>/checkpoints)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint directory's latest snapshot up to --epochs")
    t.add_argument("--on-save-error", choices=["raise", "warn"], default="raise",
                   help="a snapshot that cannot be written (disk full, read-only): stop (raise) or warn once and go on")
    t.add_argument("--comm", choices=["auto", "horovod", "mpi", "local"], default="auto",
                   help="communicator; auto follows ITERAVG_COMM, then the launcher")
    t.add_argument("--sync", choices=["mean", "broadcast"], default="mean",
                   help="how averaged models are made identical across ranks")
    t.add_argument("--posthoc", action="store_true",
                   help="also keep what rebuilds the average from any epoch on, after training (iteravg posthoc; "
                        "8 bytes per parameter per epoch on disk)")
    t.add_argument("--posthoc-keep", type=_int_at_least(1), metavar="K",
                   help="with --posthoc: keep the newest K epochs' prefixes (default: every epoch's)")
    bar = t.add_mutually_exclusive_group()
    bar.add_argument("--no-progress", action="store_true",
                     help="no progress bar (default: a bar on rank 0 when stderr is a terminal, else a log line "
                          "every 10 epochs)")
    bar.add_argument("--progress", action="store_true", help="a progress bar on rank 0 even if stderr is no terminal")
    i = sub.add_parser("inspect", help="print and verify a checkpoint", formatter_class=_HelpFormatter,
                       description="Print the latest snapshot's state and verify every file's SHA-256 and the "
                                   "averaged model's fingerprint. Exit code 0 if verified, 1 if not, 2 if the "
                                   "path does not exist.")
    i.add_argument("checkpoint_dir", metavar="PATH",
                   help="a run directory (its checkpoints/ is used), a checkpoint directory or one snapshot")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    h = sub.add_parser("posthoc", help="evaluate every averaging start of an `iteravg train --posthoc` run",
                       formatter_class=_HelpFormatter,
                       description="Rebuild the uniform average from every kept start epoch of a run trained with "
                                   "--posthoc, evaluate each on the run's validation data (MSE on standardised "
                                   "targets), print a table marking the schedule's own start and the best one, and "
                                   "write posthoc.csv and posthoc.png into the run directory. Run it on one process.")
    h.add_argument("run_dir", metavar="RUN", help="the run directory (report.json, checkpoints/)")
    h.add_argument("--json", action="store_true",
                   help='print {"schedule_start", "best_start", "rows": [{"start_epoch", "iterates", "val_mse"}]}')
    h.add_argument("--export", nargs=2, metavar=("START", "OUT"),
                   help="instead of evaluating: write the average from epoch START on as a snapshot into the "
                        "checkpoint directory OUT (net.load_parameters(OUT/averaged.params), iteravg inspect OUT)")
    ap.set_defaults(train_parser=t)
    return ap


# -- train ---------------------------------------------------------------------------------------------
def make_net(num_features: int, hidden: int, seed: int):
    """The MLP ``iteravg train`` trains (``--hidden`` units, initialised from ``--seed``); ``iteravg posthoc``
    rebuilds it from a run's configuration."""
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


_make_net = make_net  # the older name, used by tests


def _strategy(args: argparse.Namespace):
    import iteravg.mx as im

    if args.posthoc_keep is not None and not args.posthoc:
        raise ValueError("--posthoc-keep needs --posthoc")
    common = dict(comm=None if args.comm == "auto" else args.comm, sync=args.sync, posthoc=args.posthoc,
                  posthoc_keep=args.posthoc_keep)
    if args.strategy == "nta":
        return im.NTA(epochs=args.epochs, n=args.nta_n, maximize=args.maximize, last_n_trigger=args.last_n_trigger,
                      eta=args.eta, fallback_alpha=args.fallback_alpha, **common)
    if args.strategy == "alpha-suffix":
        return im.Alpha_Suffix(epochs=args.epochs, alpha=args.alpha, eta=args.eta, **common)
    poly = im.IterationAveragingStrategy(eta=args.eta, **common)  # averages every iterate, from the first batch
    poly.schedule.start(0)
    return poly


def _more_averaging(args: argparse.Namespace) -> str:
    """What to change so that the average holds more iterates (the table's hint)."""
    if args.strategy == "nta":
        return (f"train longer (--epochs) or let NTA start earlier (--fallback-alpha {max(0.5, args.fallback_alpha):g} "
                "starts it half-way at the latest)")
    if args.strategy == "alpha-suffix":
        return f"average a larger share of the epochs (--alpha, now {args.alpha:g})"
    return "train longer (--epochs)"


def _prepare_dir(path: Path, option: str) -> List[Path]:
    """Create ``path`` (and missing parents) and check it is writable; return the directories created.

    An unusable path is a ``UsageError`` naming ``option``. Nothing is left behind when it fails.
    """
    missing = _missing_dirs(path)
    p = missing[-1].parent if missing else path
    if not p.is_dir():
        raise UsageError(f"{option} {path}: {p} exists and is not a directory")
    probe = path / f".iteravg-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        remove_empty_dirs(missing)
        raise UsageError(f"{option} {path} cannot be created or written: {exc.strerror or exc}") from None
    return missing


def _missing_dirs(path: Path) -> List[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing: List[Path] = []
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def remove_empty_dirs(dirs: List[Path]) -> None:
    """``rmdir`` each directory (deepest first) while it is empty: what a failed run created, it takes back."""
    for d in dirs:
        try:
            d.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty (or not ours to remove): so are its parents
            return


class _ResumePoint:
    """A GluonTS-style callback (every hook a no-op) that, right after a resume, evaluates the restored last
    iterate and averaged model. The values go with the resume marker of the plot; they also fill the resumed
    epoch's point when its snapshot lacks them (a checkpoint written by an older iteravg). ``fit`` restores the
    training and averaging state before ``on_network_initializing_end``, so both models are the checkpoint's."""

    def __init__(self, evaluate_both: Callable[[], Tuple[float, Optional[float]]], enabled: bool) -> None:
        self.evaluate_both, self.enabled = evaluate_both, enabled
        self.values: Optional[Tuple[float, Optional[float]]] = None

    def on_network_initializing_end(self, training_network: Any) -> None:
        if self.enabled and self.values is None:
            self.values = self.evaluate_both()  # collective: every rank calls the hook

    def on_train_batch_end(self, training_network: Any) -> bool:
        return True

    def on_train_epoch_end(self, **kwargs: Any) -> bool:
        return True

    def on_validation_epoch_end(self, **kwargs: Any) -> bool:
        return True

    def on_epoch_end(self, **kwargs: Any) -> bool:
        return True

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("on_"):  # on_train_start, on_train_epoch_start, on_validation_epoch_start, ...
            return lambda *a, **k: None
        raise AttributeError(name)


def train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``iteravg train``; every rank calls it. Directories it created are removed again if a failed run
    left them empty (rank 0 creates them, so rank 0 takes them back)."""
    created: List[Path] = []
    code = EXIT_VERIFY_FAILED
    try:
        code = _train(args, parser, created)
        return code
    finally:
        if code not in (0, EXIT_STOPPED) and launcher_rank() == 0:
            remove_empty_dirs(created)


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser, created: List[Path]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import mxnet as mx

    import iteravg.mx as im
    from iteravg import __version__, collectives
    from iteravg.checkpoint import CheckpointError, latest_epoch, resolve_snapshot
    from iteravg.mx import data, report
    from iteravg.mx.checkpoint import fingerprint_hex
    from iteravg.mx.train import StoppedEarly, evaluate, finish_training, fit
    from iteravg._faults import stop_after_epoch

    prog = parser.prog
    try:
        strategy = _strategy(args)
    except ValueError as exc:
        return usage_error(prog, str(exc))
    comm = strategy.comm
    rank0 = comm.rank == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(message)s")
    log = logging.getLogger("iteravg")

    # Paths: rank 0 decides (timestamps differ across ranks) and checks them; everybody agrees.
    def plan() -> Dict[str, str]:
        out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoints"
        if args.resume:
            try:
                resolve_snapshot(ckpt)
            except CheckpointError as exc:
                raise UsageError(f"--resume: {exc}") from None
            done = latest_epoch(ckpt)
            if done is not None and args.epochs <= done:
                what = "that is all of them" if args.epochs == done else f"more than --epochs {args.epochs}"
                raise UsageError(f"--resume: {ckpt} already holds {done} trained epochs ({what}); nothing left to "
                                 f"train -- pass --epochs larger than {done} to continue")
        else:
            previous = latest_epoch(ckpt)
            if previous is not None:
                log.warning("iteravg: %s already holds a checkpoint (epoch %d); this fresh run replaces it "
                            "(use --resume to continue it instead)", ckpt, previous)
        ckpt_missing = _missing_dirs(ckpt)  # the training loop creates it at its start
        created.extend(_prepare_dir(out, "--out"))
        if args.checkpoint_dir and not ckpt.is_relative_to(out):
            created.extend(_prepare_dir(ckpt, "--checkpoint-dir"))
        created[:0] = [d for d in ckpt_missing if d not in created]  # deepest first
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
    except ValueError as exc:  # agreed: every rank has it; rank 0 reports it (its own error if it failed)
        own = exc.__cause__ if comm.size > 1 and isinstance(exc.__cause__, ValueError) else exc
        return _finish(comm, usage_error(prog, str(own)))
    per_rank = len(ds.train[1]) // comm.size
    if args.batch_size > per_rank:
        return _finish(comm, usage_error(prog, f"--batch-size {args.batch_size} is larger than each rank's share of "
                                               f"the training data ({per_rank} rows on {comm.size} rank(s))"))
    out, ckpt = Path(paths["out"]), Path(paths["ckpt"])
    net = make_net(ds.num_features, args.hidden, args.seed)
    loss_fn = mx.gluon.loss.L2Loss()  # 0.5 * squared error; every number shown is converted to MSE

    def mse(split: Any) -> float:
        """MSE of ``net`` on ``split``, each rank evaluating its share (collective, same value on all ranks)."""
        s, c = evaluate(net, loss_fn, [split[0][comm.rank :: comm.size], split[1][comm.rank :: comm.size]])
        s, c = collectives.mean_of_ranks(comm, [s, c])
        return 2.0 * s / c

    def has_average() -> bool:  # replicated state: the same on every rank after each epoch-end sync
        return strategy.averaged_state is not None and strategy.average_counter > 0

    def val_both() -> Tuple[float, Optional[float]]:
        """Validation MSE of the training weights and of the averaged model (collective)."""
        last = mse(ds.val)
        if not has_average():
            return last, None
        with strategy.averaged_weights(net):
            return last, mse(ds.val)

    callback = im.ModelIterationAveraging(strategy)  # the training loop owns the checkpoint files
    resume_point = _ResumePoint(val_both, enabled=args.resume)
    if rank0:
        log.info("iteravg %s: %s on %d rank(s) (%s), data %s: %d train / %d val / %d test", __version__,
                 args.strategy, comm.size, comm.name, ds.name, len(ds.train[1]), len(ds.val[1]), len(ds.test[1]))
    bar = _progress(args, rank0)
    first_row = [True]

    def on_epoch(row: Dict[str, Any]) -> None:
        """Every rank, after each epoch's hooks: evaluate the last iterate and the average (see report.py)."""
        last, avg = val_both()
        row.update(val_mse_last=last, val_mse_avg=avg, iterates_averaged=strategy.average_counter)
        if first_row[0] and resume_point.values is not None:
            state = callback.resumed_state or {}
            row["resumed"] = {"after_epoch": int(state.get("epoch", row["epoch"] - 1)), "world_size": comm.size,
                              "was_world_size": state.get("world_size"), "val_mse_last": resume_point.values[0],
                              "val_mse_avg": resume_point.values[1]}
        first_row[0] = False
        e = row["epoch"]
        k = strategy.average_counter
        shown = f"val MSE last iterate {last:.4f}" + (f", averaged {avg:.4f} ({k} iterate{'s' if k != 1 else ''})"
                                                      if avg is not None else "")
        if rank0 and (bar is None or bar.disable) and (e % 10 == 0 or e == strategy.schedule.trigger_epoch
                                                        or e == args.epochs):
            log.info("epoch %d/%d: train MSE %.4f, %s", e, args.epochs, 2 * row["train_loss"], shown)
        if bar is not None:
            bar.set_postfix_str(shown, refresh=False)
            bar.update(e - bar.n)  # a resumed run starts at its resumed epoch

    try:
        result = fit(net, loss_fn, ds.train, ds.val, comm=comm, callbacks=[callback, resume_point],
                     epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, momentum=args.momentum,
                     seed=args.seed, resume_from=ckpt if args.resume else None, checkpoint_dir=ckpt,
                     on_epoch=on_epoch, on_save_error=args.on_save_error)
    except StoppedEarly as exc:
        _close(bar)
        if rank0:
            log.info("%s", exc)
        return _finish(comm, EXIT_STOPPED)
    except ValueError as exc:  # e.g. a resumed checkpoint that does not fit; raised identically on every rank
        _close(bar)
        if rank0:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    _close(bar)

    last = {"test_mse": mse(ds.test), "val_mse": mse(ds.val)}
    finish_training(net, [callback], result=result)  # loads the averaged model (synced) into net; final snapshot
    averaged = {"test_mse": mse(ds.test), "val_mse": mse(ds.val)} if has_average() else None
    fp = fingerprint_hex(strategy.averaged_state.fingerprint()) if has_average() else None
    if rank0:
        metrics = {"last iterate": last}
        if averaged is not None:
            metrics["averaged"] = averaged
        trigger = strategy.schedule.trigger_epoch
        rep = {
            "iteravg_version": __version__, "config": {k: v for k, v in vars(args).items() if k not in ("command", "train_parser")},
            "data": ds.name, "world_size": comm.size, "comm": comm.name, "epochs_done": result.epochs_done,
            "resumed_from_epoch": result.resumed_from, "history": result.history, "units": report.UNITS,
            "trigger_epoch": trigger, "average_counter": strategy.average_counter,
            "metrics": metrics, "fingerprint": fp, "checkpoint_dir": str(ckpt),
        }
        out.mkdir(parents=True, exist_ok=True)
        report.write_report(out, rep)
        curves = report.curves(result.history, trigger)
        report.write_csv(out, curves)
        report.plot_losses(out, curves, f"{ds.name}: {args.strategy}, {comm.size} rank(s), {result.epochs_done} epochs")
        print(report.table(metrics, trigger_epoch=trigger, average_counter=strategy.average_counter,
                           epochs_done=result.epochs_done, more_averaging=_more_averaging(args)))
        print(f"run directory: {out}  (report.json, val_loss.png, val_loss.csv, checkpoints)")
        if args.posthoc:
            print(f"post-hoc: `iteravg posthoc {out}` evaluates every averaging start")
    return _finish(comm, 0)


def _finish(comm: Any, code: int) -> int:
    from iteravg import collectives

    collectives.finish(comm)
    return code


def _close(bar: Optional[Any]) -> None:
    if bar is not None:
        bar.close()


def _progress(args: argparse.Namespace, rank0: bool) -> Optional[Any]:
    """A tqdm bar on rank 0 only (``None`` elsewhere); shown on a terminal, or always with ``--progress``."""
    if args.no_progress or not rank0 or launcher_rank() != 0:
        return None
    from tqdm import tqdm  # noqa: WPS433

    return tqdm(total=args.epochs, desc="epochs", unit="ep", file=sys.stderr, leave=False,
                disable=False if args.progress else None)


# -- inspect -------------------------------------------------------------------------------------------
def inspect(args: argparse.Namespace) -> int:
    from iteravg.checkpoint import CheckpointError
    from iteravg.core.engine import describe_snapshot
    from iteravg.mx.checkpoint import legacy_reader

    path = Path(args.checkpoint_dir)
    if not path.exists():
        return usage_error("iteravg inspect", f"{path} does not exist (give a run directory, its checkpoints/ "
                                              "or a snapshot directory)")
    try:
        summary, problems = describe_snapshot(checkpoint_dir_of(path), legacy_reader=legacy_reader)
    except CheckpointError as exc:
        print(f"iteravg inspect: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    summary["verified"] = not problems
    if args.json:
        print(json.dumps(dict(summary, problems=problems), indent=1))
    else:
        for key, value in summary.items():
            print(f"{key:>18}: {value}")
        for p in problems:
            print(f"PROBLEM: {p}", file=sys.stderr)
    return 0 if not problems else EXIT_VERIFY_FAILED


def checkpoint_dir_of(path: Path) -> Path:
    """The checkpoint directory ``path`` names: itself if it holds a checkpoint or is a snapshot, else a run
    directory's ``checkpoints/`` (or the ``checkpoint_dir`` its ``report.json`` names, for ``--checkpoint-dir``)."""
    from iteravg.checkpoint import LATEST, STATE_FILE

    if os.path.lexists(path / LATEST) or (path / STATE_FILE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    try:
        named = Path(json.loads((path / "report.json").read_text(encoding="utf-8"))["checkpoint_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return path
    return named if named.is_absolute() and named.is_dir() else path  # a relative one was relative to the run's cwd


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
    if args.command == "posthoc":
        from iteravg.mx.posthoc_cli import posthoc  # noqa: WPS433

        return posthoc(args)
    return inspect(args)


if __name__ == "__main__":
    sys.exit(main())
