"""EarlyStopping: classic semantics, warmup, baseline, non-finite values, inputs, errors, resume."""

from __future__ import annotations

import ast
import json
import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haltpoint import (
    ConsecutiveIncreases,
    Decision,
    Divergence,
    EarlyStopping,
    GeneralizationLoss,
    ProgressQuotient,
    RelativeDelta,
    StateMismatchError,
    StopReason,
    Target,
    TimeBudget,
)
from haltpoint.stopping import STATE_VERSION, default_patience
from haltpoint.stopping.adaptive import MIN_POINTS

NAN, INF = math.nan, math.inf


def run(stopper: EarlyStopping, values: list[Any]) -> Decision | None:
    """Step through `values`; return the stop decision, or None when it never stops."""
    for value in values:
        decision = stopper.step(value)
        if decision:
            return decision
    return None


def stop_index(stopper: EarlyStopping, values: list[Any]) -> int | None:
    decision = run(stopper, values)
    return None if decision is None else decision.step


# --------------------------------------------------------------------------- semantics table

CASES = [
    # (values, settings, expected stop index, expected code)
    ([0.5, 0.4, 0.45, 0.41], {"patience": 2}, 3, StopReason.PATIENCE),
    ([0.5, 0.4, 0.3, 0.2], {"patience": 1}, None, None),
    ([1.0, 2.0, 3.0], {"patience": 1, "mode": "max"}, None, None),
    ([3.0, 2.0, 2.5], {"patience": 1, "mode": "max"}, 1, StopReason.PATIENCE),
    # a tie at exactly min_delta is not an improvement
    ([1.0, 0.5, 0.0], {"patience": 1, "min_delta": 0.5}, 1, StopReason.PATIENCE),
    ([1.0, 0.25, -0.5], {"patience": 1, "min_delta": 0.5}, None, None),
    ([1.0, 1.5], {"patience": 1, "min_delta": 0.5, "mode": "max"}, 1, StopReason.PATIENCE),
    # equal values never improve, even with min_delta=0
    ([1.0, 1.0], {"patience": 1}, 1, StopReason.PATIENCE),
    # patience=0 stops at the first evaluation that does not improve, never after an improvement
    ([1.0, 0.5, 0.25], {"patience": 0}, None, None),
    ([1.0, 0.5, 0.75], {"patience": 0}, 2, StopReason.PATIENCE),
    # the wait is reset by every improvement
    ([5.0, 6.0, 4.0, 6.0, 6.0], {"patience": 2}, 4, StopReason.PATIENCE),
    # non-finite values stop the run by default, and never become the best
    ([1.0, NAN], {"patience": 5}, 1, StopReason.NON_FINITE),
    ([1.0, INF], {"patience": 5}, 1, StopReason.NON_FINITE),
    ([1.0, -INF], {"patience": 5}, 1, StopReason.NON_FINITE),
    ([NAN], {"patience": 5}, 0, StopReason.NON_FINITE),
    # ... or count as non-improvements
    ([1.0, NAN, NAN], {"patience": 2, "check_finite": False}, 2, StopReason.PATIENCE),
    ([1.0, -INF, 0.5], {"patience": 2, "check_finite": False}, None, None),
    ([NAN, NAN], {"patience": 2, "check_finite": False}, 1, StopReason.PATIENCE),
    # warmup: no stop before evaluation `warmup`, the best and the wait are still tracked
    ([1.0, 2.0, 2.0, 2.0, 2.0], {"patience": 1, "warmup": 3}, 3, StopReason.PATIENCE),
    ([2.0, 1.0, 3.0, 3.0], {"patience": 2, "warmup": 2}, 3, StopReason.PATIENCE),
    ([1.0, 2.0, 0.5, 0.25], {"patience": 1, "warmup": 2}, None, None),
    ([1.0, NAN], {"patience": 1, "warmup": 5}, 1, StopReason.NON_FINITE),
    # baseline: beat it within `patience` evaluations after warmup
    ([1.0, 0.9, 0.8, 0.7], {"patience": 3, "baseline": 0.5}, 2, StopReason.BASELINE),
    ([1.0, 0.4, 0.45, 0.45], {"patience": 3, "baseline": 0.5}, None, None),
    ([1.0, 0.5, 0.5], {"patience": 2, "baseline": 0.5}, 1, StopReason.BASELINE),
    ([1.0, 0.9, 0.8, 0.7], {"patience": 2, "warmup": 2, "baseline": 0.5}, 3, StopReason.BASELINE),
    ([1.0, 1.0, 1.0, 1.0], {"patience": 2, "warmup": 2, "baseline": 0.5}, 2, StopReason.PATIENCE),
    ([0.2, 0.3], {"patience": 0, "baseline": 0.5, "mode": "max"}, 0, StopReason.BASELINE),
    # relative delta, right for negative values: best -2.0, 25% of |best| = 0.5
    ([-2.0, -2.5], {"patience": 1, "min_delta": RelativeDelta(0.25)}, 1, StopReason.PATIENCE),
    ([-2.0, -2.75], {"patience": 1, "min_delta": RelativeDelta(0.25)}, None, None),
    (
        [-4.0, -3.0],
        {"patience": 1, "min_delta": RelativeDelta(0.25), "mode": "max"},
        1,
        StopReason.PATIENCE,
    ),
    ([-4.0, -2.5], {"patience": 1, "min_delta": RelativeDelta(0.25), "mode": "max"}, None, None),
    ([4.0, 3.0], {"patience": 1, "min_delta": RelativeDelta(0.25)}, 1, StopReason.PATIENCE),
    ([0.0, -0.001], {"patience": 1, "min_delta": RelativeDelta(0.25)}, None, None),
]


@pytest.mark.parametrize(("values", "kwargs", "expected", "code"), CASES)
def test_stop_index_and_reason(
    values: list[float], kwargs: dict[str, Any], expected: int | None, code: StopReason | None
) -> None:
    decision = run(EarlyStopping("val_loss", **kwargs), values)
    assert (None if decision is None else decision.step) == expected
    assert (None if decision is None else decision.code) == code


def test_reason_sentence_names_metric_delta_wait_and_best() -> None:
    stopper = EarlyStopping("val_loss", patience=5, min_delta=0.001)
    values = [1.0 - 0.05 * i for i in range(12)] + [0.231, 0.3, 0.25, 0.2305, 0.24, 0.26]
    decision = run(stopper, values)
    assert decision is not None
    assert decision.reason == (
        "val_loss did not improve by more than 0.001 for 5 evaluations; "
        "best 0.2310 at evaluation 12"
    )
    assert stopper.reason == decision.reason
    assert stopper.code is StopReason.PATIENCE


@pytest.mark.parametrize(
    ("kwargs", "values", "part"),
    [
        (
            {"patience": 1, "min_delta": RelativeDelta(0.01)},
            [1.0, 1.0],
            "by more than 1% of |best|",
        ),
        (
            {"patience": 1, "baseline": 0.5},
            [1.0],
            "did not beat the baseline 0.5000 within 1 evaluation after",
        ),
        ({"patience": 1}, [1.0, 1.0], "val_loss did not improve for 1 evaluation; best"),
        ({"patience": 1}, [1.0, NAN], "val_loss is nan at evaluation 1: training has diverged"),
        (
            {"patience": 1, "check_finite": False},
            [NAN],
            "did not improve for 1 evaluation; no finite value in 1 evaluation",
        ),
        (
            {},
            [1.0] * (MIN_POINTS + 1),
            f"has levelled off: no new best for {MIN_POINTS} evaluations",
        ),
    ],
)
def test_reason_sentences(kwargs: dict[str, Any], values: list[float], part: str) -> None:
    decision = run(EarlyStopping("val_loss", **kwargs), values)
    assert decision is not None and decision.reason is not None
    assert part in decision.reason


def test_monitor_none_names_the_value() -> None:
    decision = run(EarlyStopping(patience=0), [1.0, 2.0])
    assert decision is not None and decision.reason is not None
    assert decision.reason.startswith("the monitored value did not improve")


# --------------------------------------------------------------------------- decisions and state


def test_decision_fields_track_best_and_wait() -> None:
    stopper = EarlyStopping(patience=3)
    decisions = [stopper.step(v) for v in (3.0, 2.0, 2.5, 2.25)]
    assert [d.improved for d in decisions] == [True, True, False, False]
    assert [d.wait for d in decisions] == [0, 0, 1, 2]
    assert [d.best for d in decisions] == [3.0, 2.0, 2.0, 2.0]
    assert [d.best_step for d in decisions] == [0, 1, 1, 1]
    assert [d.step for d in decisions] == [0, 1, 2, 3]
    assert not any(decisions)
    assert stopper.last_decision is decisions[-1]
    assert (stopper.best, stopper.best_step, stopper.wait, stopper.evaluations) == (2.0, 1, 2, 4)
    assert not stopper.stopped and stopper.reason is None and stopper.code is None


def test_fresh_stopper_has_no_state() -> None:
    stopper = EarlyStopping("val_loss", patience=2)
    assert stopper.last_decision is None and stopper.best is None and stopper.best_step is None
    assert not stopper.stopped


def test_stop_is_sticky_and_ignores_later_values() -> None:
    stopper = EarlyStopping(patience=1)
    first = run(stopper, [1.0, 2.0])
    assert first is not None and stopper.stopped
    again = stopper.step(0.0)
    assert again is first and bool(again)
    assert stopper.best == 1.0 and stopper.evaluations == 2


def test_decision_to_dict_is_json_and_round_trips() -> None:
    stopper = EarlyStopping("val_loss", patience=1)
    decision = run(stopper, [1.0, NAN])
    assert decision is not None
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["code"] == "non_finite" and data["stop"] is True and math.isnan(data["value"])
    back = Decision.from_dict(data)
    assert back.to_dict().keys() == data.keys()
    assert (back.code, back.reason, back.best, back.best_step) == (
        decision.code,
        decision.reason,
        decision.best,
        decision.best_step,
    )


def test_decision_from_dict_errors() -> None:
    with pytest.raises(ValueError, match=r"missing keys \['improved'"):
        Decision.from_dict({"stop": True})
    data = Decision(True, False, 1, 1.0, 1.0, 0, 1, StopReason.PATIENCE, "x").to_dict()
    data["code"] = "bored"
    with pytest.raises(ValueError, match=r"decision\['code'\] must be a stop reason .* 'bored'"):
        Decision.from_dict(data)


def test_stop_reason_values_are_stable() -> None:
    assert str(StopReason.NON_FINITE) == "non_finite"
    assert StopReason("time_budget") is StopReason.TIME_BUDGET


# --------------------------------------------------------------------------- default patience


def test_previous_default_patience_grows_with_the_step_of_the_best() -> None:
    assert [default_patience(s) for s in (None, 0, 39, 40, 99)] == [20, 20, 20, 21, 50]


def test_default_rule_stops_a_flat_series_after_its_least_wait() -> None:
    flat = EarlyStopping()
    assert stop_index(flat, [1.0] * 40) == MIN_POINTS
    assert flat.patience is None and flat.current_patience() == MIN_POINTS


@given(
    values=st.lists(st.integers(-8, 8).map(lambda i: i / 4), max_size=40),
    patience=st.integers(0, 6),
    min_delta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    mode=st.sampled_from(["min", "max"]),
)
@settings(max_examples=150, deadline=None)
def test_explicit_patience_is_classic(
    values: list[float], patience: int, min_delta: float, mode: str
) -> None:
    """With only mode/patience/min_delta: improve by > min_delta, stop when wait >= patience."""
    expected, best, wait = None, None, 0
    for i, v in enumerate(values):
        if best is None or (v + min_delta < best if mode == "min" else v - min_delta > best):
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                expected = i
                break
    assert stop_index(EarlyStopping(mode=mode, patience=patience, min_delta=min_delta), values) == (
        expected
    )


@given(
    values=st.lists(
        st.one_of(st.integers(-8, 8).map(lambda i: i / 4), st.sampled_from([NAN, INF, -INF])),
        max_size=40,
    ),
    patience=st.one_of(st.none(), st.integers(0, 6)),
    warmup=st.integers(0, 6),
    check_finite=st.booleans(),
    mode=st.sampled_from(["min", "max"]),
)
@settings(max_examples=150, deadline=None)
def test_invariants(
    values: list[float], patience: int | None, warmup: int, check_finite: bool, mode: str
) -> None:
    stopper = EarlyStopping(mode=mode, patience=patience, warmup=warmup, check_finite=check_finite)
    finite: list[float] = []
    for i, value in enumerate(values):
        decision = stopper.step(value)
        if math.isfinite(value):
            finite.append(value)
        assert decision.step == i
        if finite:
            assert decision.best == (min(finite) if mode == "min" else max(finite))
            assert decision.best_step is not None
            assert decision.wait == i - decision.best_step
        else:
            assert decision.best is None and decision.wait == i + 1
        assert decision.improved == (decision.wait == 0)
        if decision.stop and i < warmup:
            assert decision.code is StopReason.NON_FINITE
        if decision.stop:
            assert decision.reason and decision.code is not None
            break


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    "value",
    [
        0.5,
        1,
        np.float32(0.5),
        np.float64(0.5),
        np.array(0.5),
        np.array([0.5], dtype=np.float32),  # Keras logs F1Score so
        np.array([[0.5]]),
        Decimal("0.5"),
        Fraction(1, 2),
    ],
    ids=[
        "float",
        "int",
        "np.float32",
        "np.float64",
        "np 0-d",
        "np 1-d",
        "np 2-d",
        "Decimal",
        "Fraction",
    ],
)
def test_number_like_values(value: Any) -> None:
    assert EarlyStopping(patience=1).step(value).value == np.asarray(value, dtype=float).item()


def test_tensor_values() -> None:
    torch = pytest.importorskip("torch")
    stopper = EarlyStopping("val_loss", patience=1)
    assert stopper.step(torch.tensor(0.5)).best == 0.5
    assert stopper.step({"val_loss": torch.tensor([0.25], dtype=torch.float64)}).best == 0.25
    with pytest.raises(TypeError, match=r"value must be a number .* got Tensor .*does not convert"):
        stopper.step(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"got the boolean tensor\(True\)"):
        stopper.step(torch.tensor(True))


def test_stopping_modules_import_only_the_standard_library() -> None:
    package = Path(__file__).resolve().parent.parent / "src" / "haltpoint" / "stopping"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in {"torch", "numpy"}, f"{path.name} imports {name}"
                assert top in {"haltpoint", "__future__"} or top in _stdlib(), name


def _stdlib() -> frozenset[str]:
    import sys

    return frozenset(sys.stdlib_module_names)


# --------------------------------------------------------------------------- errors

CONSTRUCTOR_ERRORS = [
    ({"mode": "mni"}, ValueError, r"mode must be one of \['min', 'max', 'auto'\]; got mode='mni'"),
    ({"patience": -1}, ValueError, r"patience must be an int >= 0; got patience=-1"),
    ({"patience": 2.5}, TypeError, r"patience must be an int >= 0 or None; got float 2.5"),
    ({"patience": True}, TypeError, r"patience must be an int >= 0 or None; got bool True"),
    (
        {"min_delta": -0.1},
        ValueError,
        r"min_delta must be a finite number >= 0; got min_delta=-0.1",
    ),
    ({"min_delta": "1%"}, TypeError, r"min_delta must be a float >= 0 or a RelativeDelta .* '1%'"),
    ({"min_delta": INF}, ValueError, r"min_delta must be a finite number >= 0; got min_delta=inf"),
    ({"warmup": -2}, ValueError, r"warmup must be an int >= 0; got warmup=-2"),
    ({"warmup": None}, TypeError, r"warmup must be an int >= 0; got NoneType None"),
    ({"baseline": NAN}, ValueError, r"baseline must be finite; got baseline=nan"),
    ({"baseline": "0.5"}, TypeError, r"baseline must be a number or None; got str '0.5'"),
    ({"check_finite": "yes"}, TypeError, r"check_finite must be a bool; got 'yes'"),
    ({"rules": "target"}, TypeError, r"rules must be a list of rule objects .* got str 'target'"),
    ({"rules": [object()]}, TypeError, r"rules\[0\] must have a check\(observation\) method"),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), CONSTRUCTOR_ERRORS)
def test_constructor_errors(kwargs: dict[str, Any], error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        EarlyStopping("val_loss", **kwargs)


def test_monitor_must_be_a_name() -> None:
    with pytest.raises(TypeError, match=r"monitor must be a metric name .* got int 3"):
        EarlyStopping(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"monitor must be a metric name .* got str ''"):
        EarlyStopping("")


def test_auto_mode_infers_and_refuses() -> None:
    assert EarlyStopping("val_loss", mode="auto").mode == "min"
    assert EarlyStopping("eval/accuracy", mode="auto").mode == "max"
    with pytest.raises(ValueError, match=r"mode='auto' .* but monitor=None"):
        EarlyStopping(mode="auto")
    with pytest.raises(ValueError, match=r"cannot tell whether 'throughput' .* Known minimized"):
        EarlyStopping("throughput", mode="auto")


STEP_ERRORS = [
    ("val_loss", {"loss": 1.0, "acc": 0.5}, ValueError,
     r"monitor='val_loss' is not among the metrics passed to step\(\); the keys were "
     r"\['acc', 'loss'\]"),
    (None, {"val_loss": 1.0}, TypeError, r"step\(\) got a mapping with keys \['val_loss'\] but "
     r"monitor=None"),
    ("val_loss", "0.5", TypeError, r"value must be a number .* got str '0.5'"),
    ("val_loss", None, TypeError, r"value must be a number .* got NoneType None"),
    ("val_loss", True, TypeError, r"value must be a number .* got the boolean True"),
    ("val_loss", np.bool_(False), TypeError, r"got the boolean (np\.)?(False|False_)"),
    ("val_loss", {"val_loss": True}, TypeError, r"metrics\['val_loss'\] must be a number"),
    ("val_loss", 1 + 2j, TypeError, r"value must be a number .* got complex"),
    ("val_loss", np.array([1.0, 2.0]), TypeError, r"got ndarray array\(\[1., 2.\]\), which"),
]  # fmt: skip


@pytest.mark.parametrize(("monitor", "value", "error", "pattern"), STEP_ERRORS)
def test_step_errors(monitor: str | None, value: Any, error: type, pattern: str) -> None:
    stopper = EarlyStopping(monitor, patience=1)
    with pytest.raises(error, match=pattern):
        stopper.step(value)
    assert stopper.evaluations == 0


def test_relative_delta_errors() -> None:
    with pytest.raises(ValueError, match=r"RelativeDelta fraction must be a finite number >= 0"):
        RelativeDelta(-0.01)
    with pytest.raises(TypeError, match=r"RelativeDelta fraction must be a float; got str '1%'"):
        RelativeDelta("1%")  # type: ignore[arg-type]


# ------------------------------------------------------------ NumPy scalars as arguments

# every real-valued argument of EarlyStopping and the rules, by the name its errors use:
# (make from a value, read it back)
REAL_ARGUMENTS = {
    "min_delta": (lambda v: EarlyStopping("val_loss", min_delta=v), lambda s: s.min_delta),
    "baseline": (lambda v: EarlyStopping("val_loss", baseline=v), lambda s: s.baseline),
    "RelativeDelta fraction": (RelativeDelta, lambda d: d.fraction),
    "Target value": (Target, lambda r: r.value),
    "Divergence threshold": (Divergence, lambda r: r.threshold),
    "seconds": (TimeBudget, lambda r: r.seconds),
    "alpha": (GeneralizationLoss, lambda r: r.alpha),
    "alpha ": (ProgressQuotient, lambda r: r.alpha),  # ProgressQuotient's
}
# every count, by the name its errors use: (make from a value, read it back)
COUNT_ARGUMENTS = {
    "patience": (lambda v: EarlyStopping("val_loss", patience=v), lambda s: s.patience),
    "warmup": (lambda v: EarlyStopping("val_loss", patience=1, warmup=v), lambda s: s.warmup),
    "horizon": (lambda v: EarlyStopping("val_loss", horizon=v), lambda s: s.horizon),
    "strip": (lambda v: ProgressQuotient(1.0, strip=v), lambda r: r.strip),
    "s": (ConsecutiveIncreases, lambda r: r.s),
    "strip ": (lambda v: ConsecutiveIncreases(1, strip=v), lambda r: r.strip),  # its
}
NUMPY_REALS = [np.float64, np.float32, np.float16, np.longdouble, np.int64, np.int32, np.uint8]
NUMPY_INTS = [np.int64, np.int32, np.int8, np.uint16, np.uint64]


@pytest.mark.parametrize("kind", NUMPY_REALS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("argument", REAL_ARGUMENTS)
def test_every_real_argument_takes_a_numpy_scalar_as_a_plain_float(
    argument: str, kind: type
) -> None:
    make, read = REAL_ARGUMENTS[argument]
    got = read(make(kind(2)))
    assert got == 2.0 and type(got) is float


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (np.bool_(True), TypeError),
        (True, TypeError),
        (np.array([2.0]), TypeError),
        (np.float64("nan"), ValueError),
        (np.float32("inf"), ValueError),
        (np.longdouble("1e4000"), ValueError),  # beyond any float
        (10**400, ValueError),
    ],
    ids=["np.bool_", "bool", "array", "np nan", "np inf", "np.longdouble 1e4000", "int 10**400"],
)
@pytest.mark.parametrize("argument", REAL_ARGUMENTS)
def test_every_real_argument_refuses_bools_arrays_and_non_finite_numpy_scalars(
    argument: str, value: Any, error: type
) -> None:
    make, _ = REAL_ARGUMENTS[argument]
    with pytest.raises(error, match=f"^{argument.strip()} must be") as raised:
        make(value)
    assert "\n" not in str(raised.value) and str(raised.value).count("must be") == 1


@pytest.mark.parametrize("kind", NUMPY_INTS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("argument", COUNT_ARGUMENTS)
def test_every_count_takes_a_numpy_integer_as_a_plain_int(argument: str, kind: type) -> None:
    make, read = COUNT_ARGUMENTS[argument]
    got = read(make(kind(3)))
    assert got == 3 and type(got) is int


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (np.bool_(True), TypeError),
        (True, TypeError),
        (np.float64(3.0), TypeError),
        (3.0, TypeError),
        (np.array([3]), TypeError),
        (np.int64(-1), ValueError),
    ],
    ids=["np.bool_", "bool", "np.float64", "float", "array", "np.int64 -1"],
)
@pytest.mark.parametrize("argument", COUNT_ARGUMENTS)
def test_every_count_refuses_bools_floats_and_negative_numpy_integers(
    argument: str, value: Any, error: type
) -> None:
    make, _ = COUNT_ARGUMENTS[argument]
    with pytest.raises(error, match=f"^{argument.strip()} must be .*an int >= [01]") as raised:
        make(value)
    assert "\n" not in str(raised.value)


# ------------------------------------------------------- values no float can represent

ONE_SENTENCE = [
    (np.longdouble("1e4000"), "value must be a number a float holds (at most about 1.8e308 in "
     "size); got np.longdouble('1e+4000')"),
    (np.longdouble("-1e4000"), "value must be a number a float holds (at most about 1.8e308 in "
     "size); got np.longdouble('-1e+4000')"),
    (np.array([np.longdouble("1e4000")]), "value must be a number a float holds (at most about "
     "1.8e308 in size); got array([1.e+4000], dtype=float128)"),
    (np.clongdouble(1 + 2j), "value must be a number (a float, an int, a NumPy scalar, or a "
     "one-element array or tensor); got clongdouble np.clongdouble('1+2j')"),
    (np.array([np.clongdouble(1)]), "value must be a number (a float, an int, a NumPy scalar, "
     "or a one-element array or tensor); got ndarray array([1.+0.j], dtype=complex256)"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "message"), ONE_SENTENCE)
def test_a_value_no_float_represents_is_refused_in_one_sentence(value: Any, message: str) -> None:
    stopper = EarlyStopping("val_loss", patience=1)
    with pytest.raises((TypeError, ValueError)) as raised:
        stopper.step(value)
    assert str(raised.value) == message
    with pytest.raises((TypeError, ValueError)) as raised:
        stopper.step({"val_loss": value})
    assert str(raised.value) == message.replace("value must", "metrics['val_loss'] must")
    assert stopper.evaluations == 0


@pytest.mark.parametrize(
    "value",
    [np.longdouble("0.5"), np.array([np.longdouble("0.5")]), np.longdouble("1e-4000")],
    ids=["longdouble", "longdouble array", "longdouble below a float's least"],
)
def test_a_longdouble_a_float_holds_is_a_value(value: Any) -> None:
    decision = EarlyStopping("val_loss", patience=1).step(value)
    assert decision.value == float(np.asarray(value).item()) and type(decision.value) is float


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda v: EarlyStopping(baseline=v), "baseline must be finite; got "
         "baseline=np.longdouble('1e+4000')"),
        (lambda v: EarlyStopping(min_delta=v), "min_delta must be a finite number >= 0; got "
         "min_delta=np.longdouble('1e+4000'). (Keras silently takes its absolute value; "
         "haltpoint refuses it)"),
        (RelativeDelta, "RelativeDelta fraction must be a finite number >= 0 (0.01 means 1% of "
         "|best|); got np.longdouble('1e+4000')"),
        (Target, "Target value must be a finite number; got Target value="
         "np.longdouble('1e+4000')"),
        (TimeBudget, "seconds must be a finite number > 0; got seconds=np.longdouble('1e+4000')"),
    ],
)  # fmt: skip
def test_an_argument_no_float_represents_is_refused_in_one_sentence(
    make: Any, message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        make(np.longdouble("1e4000"))
    assert str(raised.value) == message


# --------------------------------------------------------------------------- resume


def json_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint does to the state: JSON with inf and nan allowed."""
    loaded: dict[str, Any] = json.loads(json.dumps(state, allow_nan=True))
    return loaded


def test_state_dict_holds_state_only_and_is_json() -> None:
    stopper = EarlyStopping("val_loss", patience=7, min_delta=0.5, warmup=2, baseline=3.0)
    run(stopper, [4.0, 2.0, 2.5])
    state = stopper.state_dict()
    assert set(state) == {
        "version", "monitor", "mode", "evaluations", "best", "best_step", "wait",
        "last_decision", "rules"
    }  # fmt: skip
    assert (state["monitor"], state["mode"]) == ("val_loss", "min")  # to check, never to load
    assert state["version"] == STATE_VERSION
    assert (state["evaluations"], state["best"], state["best_step"], state["wait"]) == (
        3,
        2.0,
        1,
        1,
    )
    assert json_round_trip(state) == state
    assert "patience" not in json.dumps(state) and "min_delta" not in json.dumps(state)


def test_resume_keeps_the_new_patience_and_the_old_best_and_wait() -> None:
    old = EarlyStopping("val_loss", patience=2)
    run(old, [1.0, 0.5, 0.75])
    new = EarlyStopping("val_loss", patience=4)
    new.load_state_dict(json_round_trip(old.state_dict()))
    assert (new.patience, new.best, new.best_step, new.wait) == (4, 0.5, 1, 1)
    decisions = [new.step(0.75) for _ in range(3)]
    assert [d.stop for d in decisions] == [False, False, True]
    assert decisions[-1].step == 5 and decisions[-1].wait == 4


def test_a_stopped_run_stays_stopped_after_resume() -> None:
    old = EarlyStopping("val_loss", patience=1)
    stop = run(old, [1.0, 2.0])
    assert stop is not None
    new = EarlyStopping("val_loss", patience=10)
    new.load_state_dict(json_round_trip(old.state_dict()))
    assert new.stopped and new.reason == stop.reason and new.code is StopReason.PATIENCE
    again = new.step(0.0)
    assert again.stop and again.to_dict() == stop.to_dict()
    assert new.last_decision == stop


def test_load_state_dict_errors() -> None:
    stopper = EarlyStopping("val_loss", patience=1)
    good = stopper.state_dict()
    with pytest.raises(TypeError, match=r"state must be a mapping .* got list"):
        stopper.load_state_dict([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"missing keys \['best', 'wait'\]; it has \["):
        stopper.load_state_dict({k: v for k, v in good.items() if k not in ("best", "wait")})
    with pytest.raises(ValueError, match=r"has version 2; this haltpoint reads version 1"):
        stopper.load_state_dict({**good, "version": 2})
    with pytest.raises(ValueError, match=r"'wait' must be an int, 0 .*; got -1"):
        stopper.load_state_dict({**good, "wait": -1})
    with pytest.raises(ValueError, match=r"'best' must be a finite number or None; got 'x'"):
        stopper.load_state_dict({**good, "best": "x"})
    with pytest.raises(ValueError, match=r"'last_decision' must be None before the first .* 3"):
        stopper.load_state_dict({**good, "last_decision": 3})
    with pytest.raises(
        ValueError, match=r"'rules' holds \[None\], which does not match .* 0 rules"
    ):
        stopper.load_state_dict({**good, "rules": [None]})
    assert stopper.evaluations == 0  # nothing was half-loaded


SAVED_BY = [  # (monitor, mode) of the stopper that saved, of the one that loads, the message
    (("val_loss", "min"), ("val_acc", "max"), r"monitor 'val_loss' in mode 'min'.*'val_acc'"),
    (("val_loss", "min"), ("train_loss", "min"), r"monitor 'val_loss'.* monitor 'train_loss'"),
    (("val_loss", "min"), ("val_loss", "max"), r"in mode 'min'.* in mode 'max'"),
    (("val_loss", "min"), (None, "min"), r"monitor 'val_loss'.* monitor None"),
    ((None, "max"), ("score", "max"), r"monitor None.* monitor 'score'"),
    ((None, "max"), (None, "min"), r"monitor None in mode 'max'.* monitor None in mode 'min'"),
]


@pytest.mark.parametrize(("saved_by", "loaded_by", "message"), SAVED_BY)
def test_a_state_of_another_monitor_or_mode_is_refused(
    saved_by: tuple[str | None, str], loaded_by: tuple[str | None, str], message: str
) -> None:
    old = EarlyStopping(saved_by[0], mode=saved_by[1], patience=3)
    run(old, [1.0, 2.0])
    new = EarlyStopping(loaded_by[0], mode=loaded_by[1], patience=3)
    with pytest.raises(StateMismatchError, match=message):
        new.load_state_dict(json_round_trip(old.state_dict()))
    assert new.evaluations == 0 and new.best is None  # nothing was loaded


@pytest.mark.parametrize(
    ("monitor", "mode"), [("val_loss", "min"), ("val_acc", "max"), (None, "max")]
)
def test_a_state_of_the_same_monitor_and_mode_loads(monitor: str | None, mode: str) -> None:
    old = EarlyStopping(monitor, mode=mode, patience=3)
    run(old, [1.0, 2.0])
    new = EarlyStopping(monitor, mode="auto" if monitor == "val_acc" else mode, patience=5)
    new.load_state_dict(json_round_trip(old.state_dict()))
    assert (new.evaluations, new.best, new.patience) == (2, old.best, 5)


@pytest.mark.parametrize(
    ("monitor", "mode"), [("val_loss", "min"), ("val_acc", "max"), (None, "max")]
)
def test_a_state_saved_before_monitor_and_mode_were_recorded_still_loads(
    monitor: str | None, mode: str
) -> None:
    old = EarlyStopping("val_loss", patience=3)
    run(old, [1.0, 0.5, 0.75])
    state = {k: v for k, v in old.state_dict().items() if k not in ("monitor", "mode")}
    new = EarlyStopping(monitor, mode=mode, patience=3)
    new.load_state_dict(json_round_trip(state))
    assert (new.evaluations, new.best, new.best_step, new.wait) == (3, 0.5, 1, 1)


def test_recorded_monitor_and_mode_must_be_well_formed() -> None:
    stopper = EarlyStopping("val_loss", patience=1)
    good = stopper.state_dict()
    with pytest.raises(ValueError, match=r"'monitor' must be a str or None; got 3"):
        stopper.load_state_dict({**good, "monitor": 3})
    with pytest.raises(ValueError, match=r"'mode' must be 'min' or 'max'; got 'auto'"):
        stopper.load_state_dict({**good, "mode": "auto"})


def test_rule_state_must_fit_the_rules() -> None:
    saved = EarlyStopping(patience=1, rules=[ConsecutiveIncreases(2)]).state_dict()
    other = EarlyStopping(patience=1, rules=[TimeBudget(10.0)])
    with pytest.raises(ValueError, match=r"does not match this stopper's 1 rules|does not fit"):
        other.load_state_dict({**saved, "rules": [None]})
    with pytest.raises(ValueError, match=r"TimeBudget state needs 'elapsed'"):
        other.load_state_dict(saved)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_stopper(config: dict[str, Any], clock: FakeClock) -> EarlyStopping:
    rules = [ConsecutiveIncreases(2, strip=2), TimeBudget(config["budget"], clock=clock)]
    kwargs = {k: v for k, v in config.items() if k != "budget"}
    return EarlyStopping("val_loss", rules=rules, **kwargs)


@given(
    values=st.lists(
        st.one_of(
            st.integers(-8, 8).map(lambda i: i / 4),
            st.sampled_from([NAN, INF]),
        ),
        min_size=1,
        max_size=30,
    ),
    split=st.integers(0, 30),
    config=st.fixed_dictionaries(
        {
            "mode": st.sampled_from(["min", "max"]),
            "patience": st.one_of(st.none(), st.integers(0, 5)),
            "min_delta": st.sampled_from([0.0, 0.25, RelativeDelta(0.25)]),
            "warmup": st.integers(0, 4),
            "baseline": st.one_of(st.none(), st.sampled_from([-1.0, 0.0, 1.0])),
            "check_finite": st.booleans(),
            "budget": st.sampled_from([5.0, 100.0]),
        }
    ),
)
@settings(max_examples=150, deadline=None)
def test_resume_mid_run_is_invisible(
    values: list[float], split: int, config: dict[str, Any]
) -> None:
    """Save after `split` evaluations, reload into a fresh stopper, go on: same decisions."""
    clock = FakeClock()
    straight = make_stopper(config, clock)
    expected = []
    for i, v in enumerate(values):
        clock.now = float(i)
        expected.append(json.dumps(straight.step({"val_loss": v}).to_dict()))

    clock = FakeClock()
    first = make_stopper(config, clock)
    got = []
    split = min(split, len(values))
    for i, v in enumerate(values[:split]):
        clock.now = float(i)
        got.append(json.dumps(first.step({"val_loss": v}).to_dict()))
    state = json_round_trip(first.state_dict())
    second = make_stopper(config, clock)  # created, and loaded, at the time of the save
    second.load_state_dict(state)
    assert json.dumps(second.state_dict()) == json.dumps(state)
    for i, v in enumerate(values[split:], start=split):
        clock.now = float(i)
        got.append(json.dumps(second.step({"val_loss": v}).to_dict()))
    assert got == expected


def test_reset_forgets_every_evaluation_and_the_rules_state() -> None:
    now = [0.0]
    budget = TimeBudget(50.0, clock=lambda: now[0])
    stopper = EarlyStopping("val_loss", patience=5, rules=[budget])
    stopper.step(1.0)
    now[0] = 100.0
    assert stopper.step(1.0).code is StopReason.TIME_BUDGET
    stopper.reset()
    assert (stopper.stopped, stopper.best, stopper.wait, stopper.evaluations) == (
        False,
        None,
        0,
        0,
    )
    assert budget.elapsed == 0.0  # counting again from the reset
    first = stopper.step(2.0)
    assert (first.stop, first.best, first.step) == (False, 2.0, 0)


def test_reset_restarts_the_default_rule() -> None:
    stopper = EarlyStopping("val_loss")
    for i in range(60):
        stopper.step(1.0 / (i + 1))
    stopper.reset()
    assert stopper.state_dict() == EarlyStopping("val_loss").state_dict()


# ------------------------------------------------------- a crafted state, field by field


def _stopper(kind: int) -> EarlyStopping:
    """A stopper of each kind of state: 0, the default rule's trend; 1, patience and rules."""
    if kind == 0:
        return EarlyStopping("val_loss")
    clock = FakeClock()
    rules = [TimeBudget(1000.0, clock=clock), ProgressQuotient(1.0, strip=2)]
    return EarlyStopping("val_loss", patience=2, rules=[*rules, ConsecutiveIncreases(2, strip=1)])


def _saved_states() -> list[tuple[int, dict[str, Any]]]:
    """(kind, state) of each kind after 0, 3 and 5 evaluations (kind 1 stopped after 5), as a
    checkpoint gives them back."""
    states = []
    for kind in (0, 1):
        for values in ([], [1.0, 0.5, 0.7], [1.0, 0.5, 0.7, 0.8, 0.9]):
            stopper = _stopper(kind)
            for v in values:
                stopper.step({"val_loss": v, "train_loss": v})
            states.append((kind, json_round_trip(stopper.state_dict())))
    return states


SAVED_STATES = _saved_states()
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2, 3, 2**63, 10**400])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
TOP_FIELDS = ["version", "monitor", "mode", "evaluations", "best", "best_step", "wait",
              "last_decision", "rules", "trend"]  # fmt: skip
DECISION_FIELDS = ["stop", "improved", "step", "value", "best", "best_step", "wait", "code",
                   "reason"]  # fmt: skip
FIELD_PATHS = (
    [(f,) for f in TOP_FIELDS]
    + [("last_decision", f) for f in DECISION_FIELDS]
    + [("trend", "points"), ("trend", "sums")]
)


def _crafted(state: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any] | None:
    """A copy of `state` with the field at `path` set to `value`; None where it has none."""
    state = json.loads(json.dumps(state))
    holder = state if len(path) == 1 else state.get(path[0])
    if not isinstance(holder, dict):
        return None
    holder[path[-1]] = value
    return state


def _check_refusal(exc: BaseException, names: tuple[str, ...]) -> None:
    assert isinstance(exc, (ValueError, StateMismatchError)), repr(exc)
    text = str(exc)
    assert "\n" not in text and len(text) < 1000, text
    assert any(name in text for name in names), (names, text)


def _load_or_refuse(kind: int, state: dict[str, Any], names: tuple[str, ...]) -> None:
    """Load `state` into a fresh stopper: refused in one line naming one of `names`, with
    nothing loaded; or loaded, and the stopper goes on deciding and saving."""
    stopper = _stopper(kind)
    before = json.dumps(stopper.state_dict())
    try:
        stopper.load_state_dict(state)
    except Exception as exc:  # the assertion says which
        _check_refusal(exc, names)
        assert json.dumps(stopper.state_dict()) == before  # nothing was half-loaded
        return
    for v in (0.4, 0.3, 0.9):
        stopper.step({"val_loss": v, "train_loss": v})
    json.dumps(stopper.state_dict(), allow_nan=True)


@given(saved=st.sampled_from(SAVED_STATES), path=st.sampled_from(FIELD_PATHS), value=JSON)
@settings(max_examples=600, deadline=None)
def test_a_crafted_field_is_refused_in_one_line_or_loads_and_keeps_working(
    saved: tuple[int, dict[str, Any]], path: tuple[str, ...], value: Any
) -> None:
    """Any JSON value at any field of a saved state: ValueError (StateMismatchError for
    another monitor or mode) naming the field, or a state a stopper could have saved."""
    kind, state = saved
    crafted = _crafted(state, path, value)
    if crafted is not None:
        _load_or_refuse(kind, crafted, path)


@given(
    saved=st.sampled_from(SAVED_STATES),
    rule=st.integers(0, 2),
    key=st.sampled_from([None, "elapsed", "train", "previous", "count"]),
    value=JSON,
)
@settings(max_examples=300, deadline=None)
def test_a_crafted_rule_state_is_refused_in_one_line_or_loads_and_keeps_working(
    saved: tuple[int, dict[str, Any]], rule: int, key: str | None, value: Any
) -> None:
    kind, state = saved
    state = json.loads(json.dumps(state))
    if rule >= len(state["rules"]):
        return
    if key is None:
        state["rules"][rule] = value
    elif isinstance(state["rules"][rule], dict):
        state["rules"][rule][key] = value
    _load_or_refuse(kind, state, ("rules",))


def _decision(state: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**state, "last_decision": {**state["last_decision"], **fields}}


GOING = SAVED_STATES[1][1]  # the trend's, after 3 evaluations
STOPPED = SAVED_STATES[5][1]  # patience 2 and rules, stopped
assert not GOING["last_decision"]["stop"] and STOPPED["last_decision"]["stop"]
CRAFTED = [  # (kind, the state, what the message says)
    (0, {**GOING, "wait": -1}, r"'wait' must be an int"),
    (0, {**GOING, "wait": GOING["wait"] + 1}, r"'wait' must be"),
    (0, {**GOING, "evaluations": 2**70}, r"'evaluations' must be an int from 0 to"),
    (0, {**GOING, "best_step": 1.0}, r"'best_step' must be an int"),
    (0, {**GOING, "best_step": GOING["evaluations"]}, r"'best_step' must be"),
    (0, {**GOING, "best": NAN}, r"'best' must be a finite number or None"),
    (0, {**GOING, "best": INF}, r"'best' must be a finite number or None"),
    (0, {**GOING, "best": None}, r"'best'"),
    (0, {**GOING, "version": True}, r"version True"),
    (1, _decision(STOPPED, reason=None), r"'last_decision'\['reason'\] must be a str"),
    (1, _decision(STOPPED, code=None), r"'last_decision'\['code'\]"),
    (1, _decision(STOPPED, code="PATIENCE"), r"'last_decision'\['code'\] must be .*'patience'"),
    (1, _decision(STOPPED, stop="yes"), r"'last_decision'\['stop'\] must be a bool"),
    (0, _decision(GOING, reason="crafted"), r"'last_decision'\['reason'\] must be None"),
    (0, _decision(GOING, step=[1]), r"'last_decision'\['step'\] must be"),
    (0, _decision(GOING, value={"a": 1}), r"'last_decision'\['value'\] must be a number"),
    (0, _decision(GOING, best=0.123), r"'last_decision'\['best'\] must be"),
    (0, _decision(GOING, wait=2**64), r"'last_decision'\['wait'\] must be"),
    (0, _decision(GOING, improved=True), r"'last_decision'\['improved'\]"),
    (0, {**GOING, "trend": {**GOING["trend"], "points": [[0, 10**400]]}}, r"'trend' must be"),
    (0, {**GOING, "trend": {**GOING["trend"], "points": [[-1, 1.0]]}}, r"'trend' must be"),
    (0, {**GOING, "trend": {**GOING["trend"], "points": [[0, NAN]]}}, r"'trend' must be"),
    (0, {**GOING, "trend": {**GOING["trend"], "points": [[1, 1.0], [0, 1.0]]}}, r"increasing"),
    (0, {**GOING, "trend": {**GOING["trend"], "points": [[3, 1.0]]}}, r"from 0 to 2, increas"),
    (0, {**GOING, "trend": {**GOING["trend"], "sums": [NAN] * 8}}, r"'trend' must be"),
    (0, {**GOING, "trend": {**GOING["trend"], "sums": [0.0] * 7 + [NAN]}}, r"'sums' must be the"),
    (0, {**GOING, "monitor": {"a": [10**5000]}}, r"'monitor' must be a str or None; got a dict"),
    (1, {**STOPPED, "rules": [{"elapsed": NAN}, *STOPPED["rules"][1:]]},
     r"'rules'\[0\]: TimeBudget state needs 'elapsed', a finite number"),
    (1, {**STOPPED, "rules": [*STOPPED["rules"][:2], {"previous": 10**400, "count": 0}]},
     r"'rules'\[2\]: ConsecutiveIncreases state needs"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "state", "message"), CRAFTED)
def test_a_crafted_state_is_refused_naming_the_field(
    kind: int, state: dict[str, Any], message: str
) -> None:
    stopper = _stopper(kind)
    with pytest.raises(ValueError, match=message) as raised:
        stopper.load_state_dict(state)
    assert "\n" not in str(raised.value)
    assert stopper.evaluations == 0


@pytest.mark.parametrize("patience", [None, 2])
def test_clear_stop_forgets_only_the_stop(patience: int | None) -> None:
    stopper = EarlyStopping("val_loss", patience=patience)
    values = [2.0 - 0.1 * i for i in range(10)] + [1.5 + 0.01 * i for i in range(60)]
    for value in values:
        if stopper.step(value):
            break
    assert stopper.stopped
    before = stopper.state_dict()
    stopper.clear_stop()
    after = stopper.state_dict()
    assert not stopper.stopped and stopper.reason is None and after["last_decision"] is None
    assert {k: v for k, v in after.items() if k != "last_decision"} == {
        k: v for k, v in before.items() if k != "last_decision"
    }
    resumed = EarlyStopping("val_loss", patience=patience)
    resumed.load_state_dict(after)  # a state saved after clear_stop loads, not stopped
    assert not resumed.stopped and resumed.best == stopper.best
    assert bool(resumed.step(10.0)) == bool(stopper.step(10.0))  # decided afresh, alike
