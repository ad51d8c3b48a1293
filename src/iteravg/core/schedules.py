"""When to start averaging and with which weight: small, framework-free state machines.

A schedule answers two questions and nothing else:

* ``update_trigger(metric, epoch)`` -- has averaging started? (GluonTS's ``update_average_trigger``)
* ``next_weight()`` -- the weight ``alpha_k`` of the next iterate folded into the average.

Polynomial-decay averaging (Shamir & Zhang, 2013, "Stochastic Gradient Descent for Non-smooth Optimization")
folds the k-th iterate ``x_k`` into the average ``a`` as::

    a_1 = x_1,    a_k = a_{k-1} + alpha_k * (x_k - a_{k-1}),    alpha_k = (eta + 1) / (eta + k)

``eta = 0`` gives the plain mean of all iterates; larger ``eta`` forgets early iterates faster.

The triggers reproduce GluonTS's ``gluonts.mx.trainer.model_iteration_averaging`` exactly, quirks included
(see ``NTASchedule``), but reject invalid arguments with ``ValueError`` instead of ``assert``. A schedule
keeps no reference to any model or framework, so it can be checkpointed as JSON (``state_dict``) and
restored on any number of ranks.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "Schedule",
    "NTASchedule",
    "AlphaSuffixSchedule",
    "EMASchedule",
    "EveryNSteps",
    "ConfigDifference",
    "check_eta",
    "check_fraction",
    "check_epochs",
    "check_int",
]

#: (argument, value in the checkpoint, value the schedule was constructed with).
ConfigDifference = Tuple[str, Any, Any]


def _is_real(value: Any) -> bool:
    """Python and numpy numbers alike (GluonTS accepts ``np.float32(0.5)``), but not booleans."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool,)) and type(value).__name__ != "bool_"


def check_int(name: str, value: Any) -> int:
    """An integer argument; numpy integers are accepted (``NTA(epochs=np.int64(10))`` works in GluonTS)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_eta(eta: float) -> float:
    """``alpha_k = (eta+1)/(eta+k)`` is a valid weight in (0, 1] only for ``eta > -1``."""
    if not _is_real(eta) or not math.isfinite(float(eta)) or float(eta) <= -1:
        raise ValueError(f"eta must be a finite number > -1 (alpha_k = (eta+1)/(eta+k)), got {eta!r}")
    return float(eta)


def check_fraction(name: str, value: float) -> float:
    if not _is_real(value) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_epochs(epochs: int) -> int:
    if not isinstance(epochs, numbers.Integral) or isinstance(epochs, bool) or int(epochs) < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    return int(epochs)


class Schedule:
    """Polynomial-decay averaging with no trigger of its own (GluonTS's ``IterationAveragingStrategy``).

    ``averaging_started`` may be set directly (that is how GluonTS's base class is used); subclasses set
    it from ``update_trigger``.
    """

    kind = "poly"
    #: Constructor arguments: on resume the constructor's values win (see ``load_state_dict``).
    CONFIG_KEYS: Tuple[str, ...] = ("eta",)

    def __init__(self, eta: float = 0) -> None:
        self.eta = check_eta(eta)
        #: Number of iterates folded into the average so far.
        self.average_counter = 0
        self.averaging_started = False
        #: Epoch (as passed to ``update_trigger``) at which averaging started; ``None`` before.
        self.trigger_epoch: Optional[int] = None

    # -- trigger ---------------------------------------------------------------------------------
    def needs_metric(self, epoch: int) -> bool:
        """Whether ``update_trigger(metric, epoch)`` would look at ``metric``.

        Distributed code calls this first, so that the (collective) metric reduction happens exactly when a
        decision depends on it -- on every rank alike, because it depends only on replicated state.
        """
        return False

    def update_trigger(self, metric: Any = None, epoch: int = 0) -> bool:
        """GluonTS's base class raises here. So does this one, unless averaging was started by hand (set
        ``averaging_started = True``), which is how the base class averages every iterate: then it is a no-op."""
        if self.averaging_started:
            return True
        raise NotImplementedError("IterationAveragingStrategy has no trigger; use NTA or Alpha_Suffix, or set "
                                  "averaging_started = True to average every iterate")

    def start(self, epoch: int) -> None:
        """Start averaging now (the trigger fired, or a user starts it by hand), recording the epoch."""
        self.averaging_started = True
        self.trigger_epoch = int(epoch)

    # -- weights ---------------------------------------------------------------------------------
    def peek_weight(self) -> float:
        """Weight of the next iterate without consuming it: 1.0 for the first (a copy), then (eta+1)/(eta+k)."""
        k = self.average_counter + 1
        return 1.0 if k == 1 else (self.eta + 1.0) / (self.eta + k)

    def next_weight(self) -> float:
        alpha = self.peek_weight()
        self.average_counter += 1
        return alpha

    def should_fold(self) -> bool:
        """Called once per training step: fold this step's iterate? (GluonTS's ``apply``: once averaging started.)

        ``EveryNSteps`` thins the steps out; ``EMASchedule`` counts steps to start after ``update_after_step``.
        """
        return self.averaging_started

    # -- persistence -----------------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """The constructor arguments that shape the schedule (JSON-able)."""
        return {k: getattr(self, k) for k in self.CONFIG_KEYS}

    def state_dict(self) -> Dict[str, Any]:
        """Configuration and progress together (one flat JSON object, the checkpoint's ``strategy`` record)."""
        return dict(
            self.config(),
            kind=self.kind,
            average_counter=self.average_counter,
            averaging_started=self.averaging_started,
            trigger_epoch=self.trigger_epoch,
        )

    def load_state_dict(self, state: Dict[str, Any]) -> List[ConfigDifference]:
        """Restore progress (counter, started flag, trigger epoch, metric log) -- never the configuration.

        The resume rule: what the schedule was constructed with (epochs, n, alpha, eta, ...) wins, the checkpoint
        supplies only state. Returns the configuration arguments whose checkpointed value differs, so that the
        caller can warn about each by name. Another schedule kind makes the state meaningless: ``ValueError``.
        """
        if state.get("kind") != self.kind:
            raise ValueError(
                f"checkpoint holds a {state.get('kind')!r} averaging state, but this strategy is {self.kind!r}; "
                "resume with the strategy the checkpoint was written with"
            )
        diffs = [(k, state[k], v) for k, v in self.config().items() if k in state and state[k] != v]
        self.average_counter = int(state["average_counter"])
        self.averaging_started = bool(state["averaging_started"])
        te = state.get("trigger_epoch")
        self.trigger_epoch = None if te is None else int(te)
        return diffs


class NTASchedule(Schedule):
    """Non-monotonically triggered averaging (Merity et al., 2018, AWD-LSTM's NT-ASGD), as in GluonTS.

    Averaging starts at the first epoch whose metric is worse than the best of a compare window of the
    metric log, or at the fallback epoch ``epochs * (1 - fallback_alpha)``, whichever comes first.

    GluonTS's behaviour, kept on purpose:

    * ``last_n_trigger=False`` compares against ``val_logs[:-n]`` (all but the last ``n``; needs ``n+1`` logs),
      ``last_n_trigger=True`` against ``val_logs[-n:]`` (needs ``n`` logs) -- the Salesforce code's form.
    * ``n <= 0`` disables the metric trigger (only the fallback can start averaging) and no log is kept.
    * The log is appended only while averaging has not started, after the comparison.
    * The fallback compares ``epoch >= epochs * (1 - fallback_alpha)`` with the ``epoch`` passed in; GluonTS's
      callback passes ``epoch_no + 1``, and calls without ``epoch`` pass 0.

    Unlike GluonTS, a metric the decision needs must be a finite number (``ValueError`` otherwise): a NaN
    compares false against everything and would silently poison the log.
    """

    kind = "nta"
    CONFIG_KEYS = ("eta", "epochs", "n", "maximize", "last_n_trigger", "fallback_alpha")

    def __init__(
        self,
        epochs: int,
        n: int = 5,
        maximize: bool = False,
        last_n_trigger: bool = False,
        eta: float = 0,
        fallback_alpha: float = 0.05,
    ) -> None:
        super().__init__(eta=eta)
        self.epochs = check_epochs(epochs)
        self.n = check_int("n (n <= 0 disables the metric trigger)", n)
        self.maximize = bool(maximize)
        self.last_n_trigger = bool(last_n_trigger)
        self.fallback_alpha = check_fraction("fallback_alpha", fallback_alpha)
        self.fallback_alpha_suffix = self.epochs * (1.0 - self.fallback_alpha)
        self.val_logs: List[float] = []

    def needs_metric(self, epoch: int) -> bool:
        return not self.averaging_started and epoch < self.fallback_alpha_suffix and self.n > 0

    def update_trigger(self, metric: Any = None, epoch: int = 0) -> bool:
        if not self.averaging_started and epoch >= self.fallback_alpha_suffix:
            self.start(epoch)
        if not self.averaging_started and self.n > 0:
            value = _finite_metric(metric)
            logs = self.val_logs
            min_len = self.n if self.last_n_trigger else self.n + 1
            if len(logs) >= min_len:
                window = logs[-self.n :] if self.last_n_trigger else logs[: -self.n]
                worse = value < max(window) if self.maximize else value > min(window)
                if worse:
                    self.start(epoch)
            logs.append(value)
        return self.averaging_started

    def state_dict(self) -> Dict[str, Any]:
        return dict(super().state_dict(), val_logs=list(self.val_logs))

    def load_state_dict(self, state: Dict[str, Any]) -> List[ConfigDifference]:
        diffs = super().load_state_dict(state)
        self.val_logs = [float(v) for v in state.get("val_logs", [])]
        return diffs


class AlphaSuffixSchedule(Schedule):
    """Suffix averaging (Rakhlin, Shamir & Sridharan, 2012): average the last ``alpha`` share of epochs.

    Starts when ``epoch >= epochs * (1 - alpha)``, as GluonTS's ``Alpha_Suffix`` does.
    """

    kind = "alpha_suffix"
    CONFIG_KEYS = ("eta", "epochs", "alpha")

    def __init__(self, epochs: int, alpha: float = 0.75, eta: float = 0) -> None:
        super().__init__(eta=eta)
        self.epochs = check_epochs(epochs)
        self.alpha = check_fraction("alpha", alpha)
        self.alpha_suffix = self.epochs * (1.0 - self.alpha)

    def update_trigger(self, metric: Any = None, epoch: int = 0) -> bool:
        if not self.averaging_started and epoch >= self.alpha_suffix:
            self.start(epoch)
        return self.averaging_started



class EMASchedule(Schedule):
    """Exponential moving average with warmup, in the form of timm's ``ModelEmaV3``.

    The k-th fold uses ``decay_k = clamp(1 - (1 + s / gamma) ** -power, min_decay, decay)`` with ``s = k - 1``
    folds done so far (without warmup, ``decay_k = decay``), i.e. ``avg += (1 - decay_k) * (x - avg)``; the
    first fold copies the iterate (decay 0). Averaging runs from the first step; the weight is a pure function of
    the fold count, so a resumed run needs nothing but that count. ``update_after_step`` delays the start by
    that many ``step`` calls (counted in ``steps_seen``).
    """

    kind = "ema"
    CONFIG_KEYS = ("decay", "min_decay", "warmup", "warmup_gamma", "warmup_power", "update_after_step")

    def __init__(self, decay: float = 0.9999, *, min_decay: float = 0.0, warmup: bool = True,
                 warmup_gamma: float = 1.0, warmup_power: float = 2.0 / 3.0, update_after_step: int = 0) -> None:
        super().__init__(eta=0)
        self.decay = check_fraction("decay", decay)
        self.min_decay = check_fraction("min_decay", min_decay)
        if self.min_decay > self.decay:
            raise ValueError(f"min_decay ({min_decay}) must not exceed decay ({decay})")
        self.warmup = bool(warmup)
        if not _is_real(warmup_gamma) or not float(warmup_gamma) > 0:
            raise ValueError(f"warmup_gamma must be a number > 0, got {warmup_gamma!r}")
        if not _is_real(warmup_power) or not float(warmup_power) > 0:
            raise ValueError(f"warmup_power must be a number > 0, got {warmup_power!r}")
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)
        self.update_after_step = check_int("update_after_step", update_after_step)
        if self.update_after_step < 0:
            raise ValueError(f"update_after_step must be >= 0, got {update_after_step!r}")
        self.steps_seen = 0
        self.averaging_started = self.update_after_step == 0

    def update_trigger(self, metric: Any = None, epoch: int = 0) -> bool:
        return self.averaging_started

    def should_fold(self) -> bool:
        self.steps_seen += 1
        if not self.averaging_started and self.steps_seen > self.update_after_step:
            self.averaging_started = True
        return self.averaging_started

    def decay_at(self, folds_done: int) -> float:
        if folds_done == 0:
            return 0.0
        if not self.warmup:
            return self.decay
        d = 1.0 - (1.0 + folds_done / self.warmup_gamma) ** -self.warmup_power
        return max(min(d, self.decay), self.min_decay)

    def peek_weight(self) -> float:
        return 1.0 - self.decay_at(self.average_counter)

    def state_dict(self) -> Dict[str, Any]:
        return dict(super().state_dict(), steps_seen=self.steps_seen)

    def load_state_dict(self, state: Dict[str, Any]) -> List[ConfigDifference]:
        diffs = super().load_state_dict(state)
        self.steps_seen = int(state.get("steps_seen", 0))
        return diffs


class EveryNSteps(Schedule):
    """Fold only every ``n``-th training step of ``inner`` (Lightning's ``WeightAveraging(update_every_n_steps)``).

    Everything else -- trigger, weights, state -- is ``inner``'s; the step counter is part of the state, so a
    resumed run keeps the cadence. Epoch-end folds are not affected (they are not training steps).
    """

    def __init__(self, inner: Schedule, n: int) -> None:
        self.inner = inner
        self.n = check_int("n", n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        self.step_count = 0

    # Delegation: the wrapper is the schedule the engine sees, the inner one holds the progress.
    kind = property(lambda self: f"{self.inner.kind}+every_n_steps")  # type: ignore[assignment]
    eta = property(lambda self: self.inner.eta)  # type: ignore[assignment]
    CONFIG_KEYS = ("n",)

    def __getattr__(self, name: str) -> Any:  # average_counter, averaging_started, trigger_epoch, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("inner", "n", "step_count"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def needs_metric(self, epoch: int) -> bool:
        return self.inner.needs_metric(epoch)

    def update_trigger(self, metric: Any = None, epoch: int = 0) -> bool:
        return self.inner.update_trigger(metric, epoch)

    def start(self, epoch: int) -> None:
        self.inner.start(epoch)

    def peek_weight(self) -> float:
        return self.inner.peek_weight()

    def next_weight(self) -> float:
        return self.inner.next_weight()

    def should_fold(self) -> bool:
        if not self.inner.should_fold():
            return False
        self.step_count += 1
        return self.step_count % self.n == 0

    def config(self) -> Dict[str, Any]:
        return dict(self.inner.config(), n_steps=self.n)

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.inner.state_dict(), kind=self.kind, n_steps=self.n, step_count=self.step_count)

    def load_state_dict(self, state: Dict[str, Any]) -> List[ConfigDifference]:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} averaging state, but this strategy is "
                             f"{self.kind!r}; resume with the strategy the checkpoint was written with")
        diffs = self.inner.load_state_dict(dict(state, kind=self.inner.kind))
        if "n_steps" in state and state["n_steps"] != self.n:
            diffs.append(("n_steps", state["n_steps"], self.n))
        self.step_count = int(state.get("step_count", 0))
        return diffs


def _finite_metric(metric: Any) -> float:
    try:
        value = float(metric)
    except (TypeError, ValueError):
        raise ValueError(f"metric must be a number for the NTA trigger decision, got {metric!r}") from None
    if not math.isfinite(value):
        raise ValueError(
            f"metric is {value} but the NTA trigger needs a finite value to compare; "
            "fix the loss (or, distributed, make at least one rank's metric finite)"
        )
    return value
