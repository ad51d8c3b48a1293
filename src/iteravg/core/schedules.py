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
from typing import Any, Dict, List, Optional

__all__ = ["Schedule", "NTASchedule", "AlphaSuffixSchedule", "check_eta", "check_fraction", "check_epochs"]


def check_eta(eta: float) -> float:
    """``alpha_k = (eta+1)/(eta+k)`` is a valid weight in (0, 1] only for ``eta > -1``."""
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not math.isfinite(eta) or eta <= -1:
        raise ValueError(f"eta must be a finite number > -1 (alpha_k = (eta+1)/(eta+k)), got {eta!r}")
    return float(eta)


def check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_epochs(epochs: int) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    return epochs


class Schedule:
    """Polynomial-decay averaging with no trigger of its own (GluonTS's ``IterationAveragingStrategy``).

    ``averaging_started`` may be set directly (that is how GluonTS's base class is used); subclasses set
    it from ``update_trigger``.
    """

    kind = "poly"

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

    def _start(self, epoch: int) -> None:
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

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "kind": self.kind,
            "eta": self.eta,
            "average_counter": self.average_counter,
            "averaging_started": self.averaging_started,
            "trigger_epoch": self.trigger_epoch,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(
                f"checkpoint holds a {state.get('kind')!r} averaging state, but this strategy is {self.kind!r}; "
                "resume with the strategy the checkpoint was written with"
            )
        self.eta = check_eta(state["eta"])
        self.average_counter = int(state["average_counter"])
        self.averaging_started = bool(state["averaging_started"])
        te = state.get("trigger_epoch")
        self.trigger_epoch = None if te is None else int(te)


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
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"n must be an integer (n <= 0 disables the metric trigger), got {n!r}")
        self.n = n
        self.maximize = bool(maximize)
        self.last_n_trigger = bool(last_n_trigger)
        self.fallback_alpha = check_fraction("fallback_alpha", fallback_alpha)
        self.fallback_alpha_suffix = epochs * (1.0 - self.fallback_alpha)
        self.val_logs: List[float] = []

    def needs_metric(self, epoch: int) -> bool:
        return not self.averaging_started and epoch < self.fallback_alpha_suffix and self.n > 0

    def update_trigger(self, metric: Any = None, epoch: int = 0) -> bool:
        if not self.averaging_started and epoch >= self.fallback_alpha_suffix:
            self._start(epoch)
        if not self.averaging_started and self.n > 0:
            value = _finite_metric(metric)
            logs = self.val_logs
            min_len = self.n if self.last_n_trigger else self.n + 1
            if len(logs) >= min_len:
                window = logs[-self.n :] if self.last_n_trigger else logs[: -self.n]
                worse = value < max(window) if self.maximize else value > min(window)
                if worse:
                    self._start(epoch)
            logs.append(value)
        return self.averaging_started

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(
            epochs=self.epochs,
            n=self.n,
            maximize=self.maximize,
            last_n_trigger=self.last_n_trigger,
            fallback_alpha=self.fallback_alpha,
            val_logs=list(self.val_logs),
        )
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.epochs = check_epochs(state["epochs"])
        self.n = int(state["n"])
        self.maximize = bool(state["maximize"])
        self.last_n_trigger = bool(state["last_n_trigger"])
        self.fallback_alpha = check_fraction("fallback_alpha", state["fallback_alpha"])
        self.fallback_alpha_suffix = self.epochs * (1.0 - self.fallback_alpha)
        self.val_logs = [float(v) for v in state["val_logs"]]


class AlphaSuffixSchedule(Schedule):
    """Suffix averaging (Rakhlin, Shamir & Sridharan, 2012): average the last ``alpha`` share of epochs.

    Starts when ``epoch >= epochs * (1 - alpha)``, as GluonTS's ``Alpha_Suffix`` does.
    """

    kind = "alpha_suffix"

    def __init__(self, epochs: int, alpha: float = 0.75, eta: float = 0) -> None:
        super().__init__(eta=eta)
        self.epochs = check_epochs(epochs)
        self.alpha = check_fraction("alpha", alpha)
        self.alpha_suffix = epochs * (1.0 - self.alpha)

    def update_trigger(self, metric: Any = None, epoch: int = 0) -> bool:
        if not self.averaging_started and epoch >= self.alpha_suffix:
            self._start(epoch)
        return self.averaging_started

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(epochs=self.epochs, alpha=self.alpha)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.epochs = check_epochs(state["epochs"])
        self.alpha = check_fraction("alpha", state["alpha"])
        self.alpha_suffix = self.epochs * (1.0 - self.alpha)


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
