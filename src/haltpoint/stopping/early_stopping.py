"""`EarlyStopping`: a pure state machine that turns a stream of metric values into decisions."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from haltpoint.stopping._explain import explain, trend_stop_reason
from haltpoint.stopping._state import STATE_VERSION, load_rule_states, parse_state, rule_states
from haltpoint.stopping._text import evaluations, fmt, label
from haltpoint.stopping.adaptive import TrendRule, check_horizon
from haltpoint.stopping.arguments import (
    check_baseline,
    check_count,
    check_flag,
    check_monitor,
    check_rules,
)
from haltpoint.stopping.decision import Decision, StopReason
from haltpoint.stopping.delta import Delta, RelativeDelta, beats, by_more_than, check_delta
from haltpoint.stopping.inputs import as_float, read_metric
from haltpoint.stopping.modes import Mode, resolve_mode
from haltpoint.stopping.rules import Observation, Rule, Stop

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Decide after each evaluation whether training should stop.

    With only `mode`, `patience` and `min_delta` this is Lightning's and Keras's early
    stopping: an evaluation improves when it beats the best by strictly more than `min_delta`,
    `wait` counts evaluations without improvement, and the run stops at the first evaluation
    that does not improve with `wait >= patience`.

    Args:
        monitor: the metric's key when `step()` gets a mapping, and its name in messages.
        mode: `"min"`, `"max"`, or `"auto"` to infer it from `monitor` (`val_loss` -> min).
            Left out, it is `"min"`, and refused for a monitor named like a metric where
            higher is better (`val_acc`): pass `mode="max"` there.
        patience: evaluations without improvement that stop the run; None uses the default
            rule (`haltpoint.stopping.adaptive`): stop once the recent trend projects no
            more than 0.5% further improvement (0.25% told the horizon) and the run is no
            longer clearly descending.
        min_delta: the improvement to beat: an absolute float >= 0 or a `RelativeDelta`.
        warmup: first evaluations that never stop the run (except a non-finite value) but
            still count towards the best and the wait.
        baseline: a value the best must beat (by more than `min_delta`) within `patience`
            evaluations after warmup, else the run stops.
        check_finite: stop at a non-finite value (True), or count it as a non-improvement.
        rules: extra criteria, checked in order (`Target`, `Divergence`, `TimeBudget`,
            `GeneralizationLoss`, ... or your own `Rule`).
        horizon: the planned number of evaluations (e.g. max_epochs), for the default rule
            only: it then never looks ahead past the planned end.

    Raises:
        TypeError, ValueError: for arguments of the wrong type or out of range.

    Example:
        >>> stopper = EarlyStopping("val_loss", patience=2)
        >>> [bool(stopper.step({"val_loss": v})) for v in (0.5, 0.4, 0.45, 0.41)]
        [False, False, False, True]
        >>> stopper.reason
        'val_loss did not improve for 2 evaluations; best 0.4000 at evaluation 1'
    """

    _trend: TrendRule | None
    _evaluations: int
    _best: float | None
    _best_step: int | None
    _wait: int
    _last: Decision | None

    def __init__(
        self,
        monitor: str | None = None,
        *,
        mode: str | None = None,
        patience: int | None = None,
        min_delta: float | RelativeDelta = 0.0,
        warmup: int = 0,
        baseline: float | None = None,
        check_finite: bool = True,
        rules: Iterable[Rule] = (),
        horizon: int | None = None,
    ) -> None:
        self._monitor = check_monitor(monitor)
        self._mode = resolve_mode(mode, monitor)
        self._patience = check_count(patience, "patience", allow_none=True)
        self._min_delta: Delta = check_delta(min_delta)
        self._warmup: int = check_count(warmup, "warmup")  # type: ignore[assignment]
        self._baseline = check_baseline(baseline)
        self._check_finite = check_flag(check_finite, "check_finite")
        self._rules = check_rules(rules)
        self._horizon = check_horizon(horizon)
        if self._horizon is not None and self._patience is not None:
            raise ValueError(
                f"horizon={horizon!r} is for the default rule, but patience={patience!r} was "
                "given; pass one or the other"
            )
        self._fresh_rules = rule_states(self._rules)
        self.reset()

    # configuration -----------------------------------------------------------------------

    @property
    def monitor(self) -> str | None:
        """The metric's key and name, or None."""
        return self._monitor

    @property
    def mode(self) -> Mode:
        """`"min"` or `"max"` (resolved when `"auto"` was given)."""
        return self._mode

    @property
    def patience(self) -> int | None:
        """The patience given, or None for the default rule."""
        return self._patience

    @property
    def horizon(self) -> int | None:
        """The planned number of evaluations given to the default rule, or None."""
        return self._horizon

    @property
    def min_delta(self) -> float | RelativeDelta:
        """The improvement to beat."""
        return self._min_delta

    @property
    def warmup(self) -> int:
        """Evaluations at the start that never stop the run."""
        return self._warmup

    @property
    def baseline(self) -> float | None:
        """The value the run must beat, or None."""
        return self._baseline

    @property
    def check_finite(self) -> bool:
        """Whether a non-finite value stops the run."""
        return self._check_finite

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The extra criteria, in the order they are checked."""
        return self._rules

    # state -------------------------------------------------------------------------------

    @property
    def best(self) -> float | None:
        """The best finite value so far, or None."""
        return self._best

    @property
    def best_step(self) -> int | None:
        """Index of the best evaluation, or None."""
        return self._best_step

    @property
    def wait(self) -> int:
        """Evaluations since the best one."""
        return self._wait

    @property
    def evaluations(self) -> int:
        """How many evaluations the stopper has taken (the next one gets this index)."""
        return self._evaluations

    @property
    def last_decision(self) -> Decision | None:
        """The decision of the latest `step()`, or None before the first."""
        return self._last

    @property
    def stopped(self) -> bool:
        """Whether the stopper has decided to stop; it stays stopped, also across resumes."""
        return self._last is not None and self._last.stop

    @property
    def reason(self) -> str | None:
        """The sentence saying why the run stopped, or None."""
        return self._last.reason if self.stopped else None  # type: ignore[union-attr]

    @property
    def code(self) -> StopReason | None:
        """The `StopReason` of the stop, or None."""
        return self._last.code if self.stopped else None  # type: ignore[union-attr]

    def current_patience(self) -> int:
        """The patience in force now: the one given, or the default rule's least wait at the
        latest evaluation (a share of the horizon or of the evaluations so far).

        Example:
            >>> EarlyStopping(patience=3).current_patience(), EarlyStopping().current_patience()
            (3, 5)
        """
        if self._trend is None:
            return self._patience  # type: ignore[return-value]
        return self._trend.least_wait(max(self._evaluations - 1, 0))

    def explain(self) -> str:
        """Say in one line where the stopper stands after its latest evaluation: why it
        stopped, or why it has not stopped yet.

        Stopped, it is the stop reason. Else: with a patience, how long the run has gone
        without improvement against the patience; with the default rule, before its wait the
        wait (a share of the run) it needs, past it what its latest look at the trend found
        (the possible gain against the tolerance, the descent guard holding a run that still
        falls clearly, or a run that looks diverged waiting longer). Warmup, baseline and
        rules are named where they apply. A pure read: it changes no decision. After a
        resume the default rule's latest look is not known until the next evaluation, and
        the line says so.

        Example:
            >>> stopper = EarlyStopping("val_loss", patience=5, min_delta=0.001)
            >>> for v in (0.30, 0.25, 0.2495, 0.26, 0.251):
            ...     _ = stopper.step(v)
            >>> print(stopper.explain())  # doctest: +NORMALIZE_WHITESPACE
            val_loss has not improved by more than 0.001 for 3 evaluations; it stops after 5
            (best 0.2500 at evaluation 1)
        """
        return explain(self, self._trend)

    # the decision ------------------------------------------------------------------------

    def step(self, value: object) -> Decision:
        """Take one evaluation and decide whether training should stop.

        Once stopped, the stopper ignores `value` and returns the stop decision again.

        Args:
            value: the monitored value (a float, int, NumPy scalar or one-element tensor), or
                a mapping that holds `monitor` (and whatever other metrics rules read).

        Returns:
            The `Decision`; truthy exactly when training should stop.

        Raises:
            TypeError: for a value that is not a number (booleans included), or a mapping
                when `monitor` is None.
            ValueError: when the mapping lacks `monitor` (the message lists its keys).
        """
        last = self._last
        if last is not None and last.stop:
            return last
        metrics: Mapping[str, object] | None = None
        if type(value) is float:
            x = value
        elif isinstance(value, Mapping):
            if self._monitor is None:
                raise TypeError(
                    f"step() got a mapping with keys {sorted(map(str, value))} but monitor=None; "
                    "name the metric to watch, e.g. EarlyStopping('val_loss', ...), or pass a "
                    "number"
                )
            metrics = value
            x = read_metric(value, self._monitor, "monitor")
        else:
            x = as_float(value)

        index = self._evaluations
        self._evaluations = index + 1
        finite = math.isfinite(x)
        best = self._best
        improved = finite and (best is None or beats(x, best, self._mode, self._min_delta))
        if improved:
            self._best = best = x
            self._best_step = index
            self._wait = 0
        else:
            self._wait += 1
        if self._trend is not None and finite:
            self._trend.observe(index, x)

        stop: Stop | None = None
        if not finite and self._check_finite:
            stop = self._non_finite(x, index)
        else:
            if self._rules:
                stop = self._check_rules_at(index, x, metrics, improved)
            if index < self._warmup:
                stop = None
            elif stop is None:
                stop = self._check_patience(index, improved)

        decision = Decision(
            stop=stop is not None,
            improved=improved,
            step=index,
            value=x,
            best=best,
            best_step=self._best_step,
            wait=self._wait,
            code=None if stop is None else stop.code,
            reason=None if stop is None else stop.message,
        )
        self._last = decision
        return decision

    def _check_rules_at(
        self, index: int, x: float, metrics: Mapping[str, object] | None, improved: bool
    ) -> Stop | None:
        obs = Observation(
            step=index,
            value=x,
            metrics={self._monitor or "value": x} if metrics is None else metrics,
            monitor=self._monitor,
            mode=self._mode,
            best=self._best,
            best_step=self._best_step,
            improved=improved,
            wait=self._wait,
        )
        first: Stop | None = None
        for rule in self._rules:  # every rule sees every evaluation, to keep its state
            verdict = rule.check(obs)
            if first is None and verdict is not None:
                first = verdict
        return first

    def _check_patience(self, index: int, improved: bool) -> Stop | None:
        patience = self._patience if self._patience is not None else self.current_patience()
        if (
            self._baseline is not None
            and index - self._warmup + 1 >= patience
            and not (
                self._best is not None
                and beats(self._best, self._baseline, self._mode, self._min_delta)
            )
        ):
            return Stop(
                f"{label(self._monitor)} did not beat the baseline {fmt(self._baseline)}"
                f"{by_more_than(self._min_delta)} within {evaluations(patience)} after "
                f"warmup; best {fmt(self._best)} at evaluation {self._best_step}. Check the "
                "setup, or lower the baseline",
                StopReason.BASELINE,
            )
        if self._trend is not None:  # its fast lane may stop before the least wait
            patience = self._trend.earliest_wait(index)
        if improved or self._wait < patience:
            return None
        if self._trend is not None and self._best is not None:
            return self._trend_stop(index, self._best)
        if self._best is None:
            found = f"no finite value in {evaluations(self._wait)}"
        else:
            found = f"best {fmt(self._best)} at evaluation {self._best_step}"
        return Stop(
            f"{label(self._monitor)} did not improve{by_more_than(self._min_delta)} for "
            f"{evaluations(self._wait)}; {found}",
            StopReason.PATIENCE,
        )

    def _trend_stop(self, index: int, best: float) -> Stop | None:
        trend = self._trend
        assert trend is not None
        projection = trend.check(index, best, self._wait)
        if projection is None:
            return None
        code = trend.code(projection, best, 1.0 if self._mode == "min" else -1.0)
        checked = trend.last_check
        assert checked is not None and checked.evaluation == index
        found = f"best {fmt(best)} at evaluation {self._best_step}"
        return Stop(
            trend_stop_reason(label(self._monitor), trend, checked, code, self._wait, found), code
        )

    def _non_finite(self, x: float, index: int) -> Stop:
        if self._best is None:
            found = "no finite value so far"
        else:
            found = f"best {fmt(self._best)} at evaluation {self._best_step}"
        return Stop(
            f"{label(self._monitor)} is {x} at evaluation {index}: training has diverged or "
            f"broken; {found}. Lower the learning rate or check the data, or pass "
            "check_finite=False to count non-finite values as non-improvements",
            StopReason.NON_FINITE,
        )

    # reuse and resume --------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every evaluation, as if just constructed, to reuse the stopper for a new fit.

        Stateful rules go back to the state they had at construction (a `TimeBudget` starts
        counting again).

        Example:
            >>> stopper = EarlyStopping(patience=0)
            >>> bool(stopper.step(1.0)), bool(stopper.step(2.0))
            (False, True)
            >>> stopper.reset()
            >>> stopper.stopped, stopper.best, stopper.evaluations
            (False, None, 0)
        """
        sign = 1.0 if self._mode == "min" else -1.0
        self._trend = TrendRule(sign, self._horizon) if self._patience is None else None
        load_rule_states(self._rules, self._fresh_rules)
        self._evaluations = 0
        self._best = None
        self._best_step = None
        self._wait = 0
        self._last = None

    def clear_stop(self) -> None:
        """Forget only the stop decision, to train on past it: with a new configuration after
        a resume (a larger `patience`, a longer `TimeBudget`), or on purpose.

        The best, the wait, the evaluation count, the default rule's trend and the rules'
        state stay, so the next evaluation is decided by this stopper's configuration from
        where the run stood: with the configuration that stopped it, a run that does not
        improve stops again at once. `reset()` forgets everything instead.

        Example:
            >>> stopper = EarlyStopping(patience=1)
            >>> [bool(stopper.step(v)) for v in (1.0, 2.0)]
            [False, True]
            >>> resumed = EarlyStopping(patience=3)          # more patience on a resume
            >>> resumed.load_state_dict(stopper.state_dict())
            >>> resumed.stopped, bool(resumed.step(3.0))      # still the stop it saved
            (True, True)
            >>> resumed.clear_stop()
            >>> [bool(resumed.step(v)) for v in (3.0, 4.0)], resumed.best, resumed.wait
            ([False, True], 1.0, 3)
        """
        self._last = None

    def state_dict(self) -> dict[str, Any]:
        """Return the state (never the configuration) as JSON-able values.

        `monitor` and `mode` are recorded only for `load_state_dict` to check: a state loads
        into a stopper of the same metric and direction, never changing its configuration.
        Floats may be inf or nan (in `last_decision`); the checkpoint's state codec keeps them.

        Example:
            >>> stopper = EarlyStopping(patience=3)
            >>> _ = stopper.step(1.0)
            >>> stopper.state_dict()["best"], stopper.state_dict()["version"]
            (1.0, 1)
        """
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "monitor": self._monitor,
            "mode": self._mode,
            "evaluations": self._evaluations,
            "best": self._best,
            "best_step": self._best_step,
            "wait": self._wait,
            "last_decision": None if self._last is None else self._last.to_dict(),
            "rules": rule_states(self._rules),
        }
        if self._trend is not None:  # the default rule's recent values; absent otherwise
            state["trend"] = self._trend.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by `state_dict()`; the configuration stays as constructed.

        A run that had stopped stays stopped: `step()` returns the stop decision again.

        Raises:
            TypeError: when `state` is not a mapping.
            ValueError: for a missing key, another version, a value of the wrong type, or a
                rule list that does not match this stopper's rules.
            StateMismatchError: the state was saved by a stopper of another `monitor` or
                `mode` (a state without them, from an older haltpoint, loads as before).
        """
        saved = parse_state(state, self._rules, self._monitor, self._mode)
        before = (
            None if self._trend is None else self._trend.state_dict(),
            rule_states(self._rules),
        )
        try:
            if self._trend is not None:  # a state saved without it starts the fit afresh
                self._trend.load_state_dict(state.get("trend"), saved.evaluations)
            load_rule_states(self._rules, saved.rules)
        except ValueError:  # a rule's or the trend's state: put back what was loaded
            if self._trend is not None:
                self._trend.load_state_dict(before[0])
            load_rule_states(self._rules, before[1])
            raise
        self._evaluations = saved.evaluations
        self._best = saved.best
        self._best_step = saved.best_step
        self._wait = saved.wait
        self._last = saved.last_decision

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self._monitor!r}, mode={self._mode!r}, "
            f"patience={self._patience!r}, min_delta={self._min_delta!r}, warmup={self._warmup}, "
            f"baseline={self._baseline!r}, check_finite={self._check_finite}, "
            f"rules={list(self._rules)!r}, horizon={self._horizon!r})"
        )
