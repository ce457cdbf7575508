"""Tests of haltpoint.state.load: saved values back into live objects, through the whole layer."""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from haltpoint.errors import StateMismatchError
from haltpoint.state.load import LoadReport, check_claims, load_into
from haltpoint.state.optimizer import PARAM_SHAPED, SCALARS
from haltpoint.state.rng import capture_rng, restore_rng
from haltpoint.state.tree import claimed_state, flatten_state, unflatten_state
from test_state_codec import assert_same


class Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(3, width)
        self.norm = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.norm(self.fc(x)))))


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)


class Counter:
    """A duck-typed stateful object, like haltpoint's EarlyStopping."""

    def __init__(self) -> None:
        self.best = float("inf")
        self.wait = 0
        self.history: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait, self.history = state["best"], state["wait"], list(state["history"])


def save_and_reload(state: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoint manager does: flatten, JSON text, copied tensors, unflatten."""
    flat = flatten_state(state)
    tree = json.loads(json.dumps(flat.tree, allow_nan=False))
    return unflatten_state(tree, {k: t.detach().clone() for k, t in flat.tensors.items()})


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    scale = random.random() + float(np.random.rand())

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean() * scale
        loss.backward()
        return loss

    loss = optimizer.step(closure)  # type: ignore[arg-type]
    return float(loss.detach())  # type: ignore[union-attr]


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p),
    "Adadelta": lambda p: torch.optim.Adadelta(p),
    "Adamax": lambda p: torch.optim.Adamax(p),
    "NAdam": lambda p: torch.optim.NAdam(p),
    "RAdam": lambda p: torch.optim.RAdam(p),
    "RMSprop": lambda p: torch.optim.RMSprop(p, momentum=0.5, centered=True),
    "Rprop": lambda p: torch.optim.Rprop(p),
    "ASGD": lambda p: torch.optim.ASGD(p),
    "LBFGS": lambda p: torch.optim.LBFGS(p, history_size=3, max_iter=4),
    "Adafactor": lambda p: torch.optim.Adafactor(p),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_round_trip_and_resume(name: str) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = OPTIMIZERS[name](model.parameters())
    for _ in range(3):
        train_step(model, optimizer)
    saved = save_and_reload({"model": model, "optimizer": optimizer})

    fresh_model = Net()
    fresh_optimizer = OPTIMIZERS[name](fresh_model.parameters())
    assert load_into({"model": fresh_model, "optimizer": fresh_optimizer}, saved) == LoadReport()
    assert_same(fresh_model.state_dict(), model.state_dict())
    assert_same(fresh_optimizer.state_dict(), optimizer.state_dict())

    rng = capture_rng()
    train_step(model, optimizer)
    restore_rng(rng)
    train_step(fresh_model, fresh_optimizer)
    assert_same(fresh_model.state_dict(), model.state_dict())
    assert_same(fresh_optimizer.state_dict(), optimizer.state_dict())


def test_sparse_adam_with_int_step_counters() -> None:
    embed = nn.Embedding(6, 3, sparse=True)
    optimizer = torch.optim.SparseAdam(embed.parameters())
    embed(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    assert type(optimizer.state_dict()["state"][0]["step"]) is int
    saved = save_and_reload({"embed": embed, "optimizer": optimizer})
    fresh = nn.Embedding(6, 3, sparse=True)
    fresh_optimizer = torch.optim.SparseAdam(fresh.parameters())
    load_into({"embed": fresh, "optimizer": fresh_optimizer}, saved)
    assert_same(fresh_optimizer.state_dict(), optimizer.state_dict())


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 4, 4], gamma=0.5),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=8, power=2.0),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=7),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=1),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda epoch: 0.9**epoch),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[2],
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_round_trip(name: str) -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = SCHEDULERS[name](optimizer)
    for _ in range(5):
        train_step(model, optimizer)
        if name == "ReduceLROnPlateau":
            scheduler.step(1.0)  # never improves after the first: the lr drops
        else:
            scheduler.step()
    saved = save_and_reload({"model": model, "optimizer": optimizer, "scheduler": scheduler})

    fresh_model = Net()
    fresh_optimizer = torch.optim.SGD(fresh_model.parameters(), lr=0.1, momentum=0.9)
    fresh_scheduler = SCHEDULERS[name](fresh_optimizer)
    state = {"model": fresh_model, "optimizer": fresh_optimizer, "scheduler": fresh_scheduler}
    load_into(state, saved)
    assert_same(fresh_scheduler.state_dict(), scheduler.state_dict())
    assert_same(fresh_optimizer.state_dict(), optimizer.state_dict())
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def _two_groups(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    return optimizer


def _crafted_scheduler(name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """A real saved state of scheduler `name` with `changes` (a crafted manifest: a checksum
    is no signature); for SequentialLR, of its first scheduler when a key starts with `0.`."""
    saved = dict(SCHEDULERS[name](_two_groups(Net())).state_dict())
    for key, value in changes.items():
        if key.startswith("0."):
            first, *rest = saved["_schedulers"]
            saved["_schedulers"] = [{**first, key[2:]: value}, *rest]
        else:
            saved[key] = value
    return saved


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("StepLR", {"optimizer": {"param_groups": []}}, "the key 'optimizer', which would replace"),
        ("StepLR", {"step": 1}, "the key 'step', which would replace the .*StepLR's own attrib"),
        ("StepLR", {"get_last_lr": None}, "the key 'get_last_lr', which would replace"),
        ("StepLR", {"last_epoch": "x"}, "has last_epoch=0, the checkpoint last_epoch='x'"),
        ("StepLR", {"_step_count": [1]}, r"has _step_count=1, the checkpoint _step_count=\[1\]"),
        ("StepLR", {"base_lrs": [0.1]}, r"has base_lrs=\[0.1, 0.1\], the checkpoint base_lrs="),
        ("StepLR", {"gamma": True}, "has gamma=0.5, the checkpoint gamma=True"),
        ("StepLR", {"_get_lr_called_within_step": 1}, "_get_lr_called_within_step=False, the"),
        ("StepLR", {"base_lrs": [10**5000]}, "base_lrs=<a list holding an int too long"),
        ("ReduceLROnPlateau", {"optimizer": None}, "the key 'optimizer', which would replace"),
        ("ReduceLROnPlateau", {"num_bad_epochs": "3"}, "has num_bad_epochs=0, the checkpoint"),
        ("SequentialLR", {"0.optimizer": 1}, "scheduler 0: the checkpoint's state has the key"),
        ("SequentialLR", {"0.factor": "x"}, "scheduler 0: the scheduler has factor=0.5, the"),
        ("SequentialLR", {"_schedulers": "x"}, "has 2 schedulers, the checkpoint 'x'"),
    ],
    ids=[
        "optimizer-replaced", "step-method-shadowed", "get-last-lr-shadowed", "last-epoch-a-string",
        "step-count-a-list", "base-lrs-one-short", "gamma-a-bool", "flag-an-int",
        "base-lrs-of-an-int-of-5000-digits", "plateau-optimizer", "plateau-count-a-string",
        "sequential-inner-optimizer", "sequential-inner-factor", "sequential-schedulers-a-string",
    ],
)  # fmt: skip
def test_a_crafted_scheduler_state_is_refused_before_anything_loads(
    name: str, changes: dict[str, Any], message: str
) -> None:
    """torch's schedulers copy every key they are given into their `__dict__`: these loaded,
    and the scheduler's `optimizer` (or its `step` method) was replaced, or its next `step()`
    raised TypeError or AttributeError in the training loop."""
    model = Net()
    optimizer = _two_groups(model)
    scheduler = SCHEDULERS[name](optimizer)
    before = {k: v for k, v in scheduler.__dict__.items() if k != "optimizer"}
    saved = {"model": Net().state_dict(), "scheduler": _crafted_scheduler(name, changes)}
    with pytest.raises(StateMismatchError, match=rf'cannot load state\["scheduler"\].*{message}'):
        load_into({"model": model, "scheduler": scheduler}, saved)
    assert scheduler.optimizer is optimizer
    assert {k: v for k, v in scheduler.__dict__.items() if k != "optimizer"} == before
    assert not torch.equal(model.fc.weight, saved["model"]["fc.weight"])


@pytest.mark.parametrize(
    ("saved_as", "loaded_into"),
    [
        ("StepLR", "ReduceLROnPlateau"),
        ("StepLR", "MultiStepLR"),
        ("CosineAnnealingLR", "OneCycleLR"),
        ("ReduceLROnPlateau", "LinearLR"),
        ("LinearLR", "PolynomialLR"),
    ],
)
def test_another_kind_of_scheduler_s_state_is_refused(saved_as: str, loaded_into: str) -> None:
    """torch copies the keys in beside the live ones: a StepLR's state "loaded" into a
    ReduceLROnPlateau left its patience, factor and counts as they were, silently."""
    scheduler = SCHEDULERS[loaded_into](_two_groups(Net()))
    before = {k: v for k, v in scheduler.__dict__.items() if k != "optimizer"}
    saved = {"scheduler": dict(SCHEDULERS[saved_as](_two_groups(Net())).state_dict())}
    with pytest.raises(StateMismatchError, match=r"another kind of scheduler's state, with "):
        load_into({"scheduler": scheduler}, saved)
    assert {k: v for k, v in scheduler.__dict__.items() if k != "optimizer"} == before


def test_a_scheduler_state_with_settings_on_one_side_only_loads() -> None:
    """A key only one side has is how torch versions differ (a newer torch's setting): it
    loads, as torch loads it."""
    scheduler = lr_scheduler.StepLR(_two_groups(Net()), step_size=2)
    saved = {**scheduler.state_dict(), "last_epoch": 3, "a_newer_setting": 1.0}
    load_into({"scheduler": scheduler}, {"scheduler": saved})
    assert scheduler.last_epoch == 3


def test_full_state_round_trip() -> None:
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    counter = Counter()
    for step in range(3):
        x, y = torch.randn(8, 3), torch.randn(8, 2)
        optimizer.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        counter.history.append(float(step))
    counter.best, counter.wait = 0.25, 2
    ema = torch.randn(4, 3).t()  # not contiguous
    values = {"epoch": 3, "best": float("nan"), "tags": ("a", b"b"), "big": 2**80}
    array = np.arange(5, dtype=np.int16)
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "stopper": counter,
        "ema": ema,
        "array": array,
        **values,
    }
    saved = save_and_reload(state)

    fresh_model = Net()
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2)
    fresh_ema, fresh_array = torch.zeros(4, 3).t(), np.zeros(5, dtype=np.int16)
    fresh: dict[str, Any] = {
        "model": fresh_model,
        "optimizer": fresh_optimizer,
        "scheduler": lr_scheduler.StepLR(fresh_optimizer, step_size=1, gamma=0.9),
        "scaler": torch.amp.GradScaler("cpu"),
        "stopper": Counter(),
        "ema": fresh_ema,
        "array": fresh_array,
        "epoch": 0,
        "best": 0.0,
        "tags": None,
        "big": 0,
    }
    assert load_into(fresh, saved) == LoadReport(missing=[], unexpected=[])
    for name in ("model", "optimizer", "scheduler", "scaler", "stopper"):
        assert_same(fresh[name].state_dict(), state[name].state_dict(), name)
    assert fresh["ema"] is fresh_ema and torch.equal(fresh_ema, ema)
    assert fresh["array"] is fresh_array
    np.testing.assert_array_equal(fresh_array, array)
    for name, value in values.items():
        assert_same(fresh[name], value, name)


# -- names: strict and not -------------------------------------------------------------------


def test_strict_name_mismatch_raises_before_loading() -> None:
    state: dict[str, Any] = {"epoch": 0, "scheduler": 1}
    with pytest.raises(
        StateMismatchError,
        match=r"missing from the checkpoint: 'scheduler'; restore only the entries it holds, "
        r"or pass strict=False",
    ):
        load_into(state, {"epoch": 5, "extra": 1})
    assert state == {"epoch": 0, "scheduler": 1}


def test_entries_not_asked_for_are_reported_not_refused() -> None:
    model, saved_model = Net(), Net()
    saved = save_and_reload(
        {
            "model": saved_model,
            "optimizer": torch.optim.SGD(saved_model.parameters(), lr=0.1),
            "epoch": 3,
        }
    )
    report = load_into({"model": model}, saved)  # strict: inside the entry asked for
    assert report == LoadReport(missing=[], unexpected=["optimizer", "epoch"])
    assert torch.equal(model.fc.weight, saved_model.fc.weight)
    with pytest.raises(StateMismatchError, match="does not match state"):
        load_into({"model": Small()}, saved)


def test_non_strict_name_mismatch_goes_to_the_report() -> None:
    state: dict[str, Any] = {"epoch": 0, "scheduler": 1}
    report = load_into(state, {"epoch": 5, "extra": 1}, strict=False)
    assert report == LoadReport(missing=["scheduler"], unexpected=["extra"])
    assert state == {"epoch": 5, "scheduler": 1}


# -- modules: keys, shapes, prefixes ---------------------------------------------------------


def test_strict_module_key_mismatch_names_the_keys_and_loads_nothing() -> None:
    saved = save_and_reload({"model": Small()})
    target = Net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(
        StateMismatchError,
        match=r"does not match state\[\"model\"\]: missing from the checkpoint: "
        r"'model.norm.weight'.*pass strict=False",
    ):
        load_into({"model": target}, saved)
    for key, value in target.state_dict().items():  # fc matched, yet is back as it was
        assert torch.equal(value, before[key]), key


def test_a_model_of_another_dtype_is_refused_not_converted() -> None:
    saved = save_and_reload({"model": Net()})
    target = Net().half()
    before = target.fc.weight.clone()
    with pytest.raises(
        StateMismatchError,
        match=r"model.fc.weight: the model holds torch.float16, the checkpoint torch.float32 "
        r"\(.* more differ.*\); haltpoint does not convert: .*model.to\(torch.float32\)",
    ):
        load_into({"model": target}, saved, strict=False)
    assert torch.equal(target.fc.weight, before)


def test_non_strict_module_reports_missing_and_unexpected_keys() -> None:
    small, net = Small(), Net()
    report = load_into({"model": net}, save_and_reload({"model": small}), strict=False)
    assert report.unexpected == []
    assert report.missing == [
        "model.norm.weight",
        "model.norm.bias",
        "model.norm.running_mean",
        "model.norm.running_var",
        "model.head.weight",
        "model.head.bias",
    ]
    assert torch.equal(net.fc.weight, small.fc.weight)
    report = load_into({"model": Small()}, save_and_reload({"model": Net()}), strict=False)
    assert report.missing == []
    assert report.unexpected[:2] == ["model.norm.weight", "model.norm.bias"]


@pytest.mark.parametrize("strict", [True, False])
def test_shape_mismatch_raises_even_when_not_strict(strict: bool) -> None:
    saved = save_and_reload({"epoch": 9, "model": Net(width=4)})
    target = Net(width=5)
    before = target.fc.weight.clone()
    state: dict[str, Any] = {"epoch": 0, "model": target}
    with pytest.raises(
        StateMismatchError,
        match=r"cannot load model.fc.weight: the model has shape \(5, 3\), the checkpoint "
        r"\(4, 3\) \(6 more differ: model.fc.bias, model.norm.weight, .*, \.\.\.\); "
        "build the model with the checkpoint's configuration",
    ):
        load_into(state, saved, strict=strict)
    assert state["epoch"] == 0  # nothing was loaded
    assert torch.equal(target.fc.weight, before)


def _prefixed(state_dict: Any, prefix: str) -> OrderedDict[str, Any]:
    """A state dict as a wrapper would write it, _metadata included."""
    result = OrderedDict((prefix + k, v) for k, v in state_dict.items())
    result._metadata = OrderedDict(  # type: ignore[attr-defined]
        [("", {"version": 1})]
        + [((prefix + k).rstrip("."), v) for k, v in state_dict._metadata.items()]
    )
    return result


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "module.module."])
def test_wrapper_prefixes_in_the_checkpoint_are_stripped(prefix: str) -> None:
    source = Net()
    target = Net()
    report = load_into({"model": target}, {"model": _prefixed(source.state_dict(), prefix)})
    assert report == LoadReport()
    assert_same(target.state_dict(), source.state_dict())


def test_real_compiled_state_dict_loads_into_a_plain_model() -> None:
    source = Net()
    raw = torch.compile(source).state_dict()
    assert next(iter(raw)).startswith("_orig_mod.")
    target = Net()
    load_into({"model": target}, {"model": raw})
    assert_same(target.state_dict(), source.state_dict())


@pytest.mark.parametrize(
    "wrap", [torch.compile, nn.DataParallel], ids=["torch.compile", "DataParallel"]
)
def test_wrapped_targets_are_unwrapped(wrap: Callable[[nn.Module], nn.Module]) -> None:
    source, target = Net(), Net()
    saved = save_and_reload({"model": source})
    load_into({"model": wrap(target)}, saved)
    assert_same(target.state_dict(), source.state_dict())


class Outer(nn.Module):
    """A model whose own keys start with ``module.``: they must not be stripped."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(2, 2)


def test_genuine_module_prefix_is_kept() -> None:
    source, target = Outer(), Outer()
    load_into({"model": target}, save_and_reload({"model": source}))
    assert_same(target.state_dict(), source.state_dict())
    target = Outer()
    load_into({"model": target}, {"model": _prefixed(source.state_dict(), "module.")})
    assert_same(target.state_dict(), source.state_dict())


class Versioned(nn.Module):
    """Records the version its loader sees, which comes from the state dict's ``_metadata``."""

    _version = 3

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.seen: list[Any] = []

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, *a: Any):  # type: ignore[no-untyped-def]
        self.seen.append(local_metadata.get("version"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *a)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_module_versions_survive_saving_and_prefix_stripping(prefix: str) -> None:
    saved = save_and_reload({"model": Versioned()})
    saved["model"] = _prefixed(saved["model"], prefix) if prefix else saved["model"]
    target = Versioned()
    load_into({"model": target}, saved)
    assert target.seen == [3]


def test_module_needs_a_state_dict() -> None:
    with pytest.raises(StateMismatchError, match=r"the checkpoint holds a list, not a state dict"):
        load_into({"model": Net()}, {"model": [1]})


# -- optimizers and other stateful objects ---------------------------------------------------


def test_optimizer_over_other_parameters_is_refused_before_loading() -> None:
    small = Small()
    saved = save_and_reload({"epoch": 4, "optimizer": torch.optim.AdamW(small.parameters())})
    state: dict[str, Any] = {"epoch": 0, "optimizer": torch.optim.AdamW(Net().parameters())}
    with pytest.raises(
        StateMismatchError,
        match=r"the optimizer has parameter groups of sizes \[6\], the checkpoint \[2\]",
    ):
        load_into(state, saved)
    assert state["epoch"] == 0


def test_optimizer_needs_param_groups() -> None:
    with pytest.raises(StateMismatchError, match="no optimizer state dict"):
        load_into({"optimizer": torch.optim.SGD(Small().parameters(), lr=0.1)}, {"optimizer": {}})


def test_failing_load_state_dict_is_a_state_mismatch() -> None:
    with pytest.raises(
        StateMismatchError,
        match=r"cannot load state\[\"stopper\"\] into a test_state_load.Counter: KeyError: 'best'",
    ):
        load_into({"stopper": Counter()}, {"stopper": {"wait": 1}})


class Exploding:
    """A stateful object whose `load_state_dict` raises what no one expects, over lines."""

    def state_dict(self) -> dict[str, Any]:
        return {"x": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ZeroDivisionError("first line\n  second line")


def test_any_error_of_load_state_dict_is_one_line_and_names_what_was_loaded() -> None:
    """It was a raw ZeroDivisionError (only six exception types were translated)."""
    model = Small()
    with pytest.raises(StateMismatchError) as refused:
        load_into({"model": model, "odd": Exploding()}, {"model": Small().state_dict(), "odd": {}})
    message = str(refused.value)
    assert "\n" not in message
    assert "into a test_state_load.Exploding: ZeroDivisionError: first line" in message
    assert "'model' already hold the checkpoint's values" in message


def test_a_module_value_that_is_no_tensor_is_refused_before_anything_loads() -> None:
    """torch loaded the other keys, then reported it (found by the hostile fuzzing)."""
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateMismatchError, match=r"model.weight: the checkpoint holds a int, not"):
        load_into({"model": model}, {"model": {"weight": 0, "bias": other.bias.detach()}})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(("key", "name"), [(True, "bool"), (None, "NoneType")])
def test_a_module_key_that_is_no_string_is_refused_before_anything_loads(
    strict: bool, key: Any, name: str
) -> None:
    """torch loaded the bias, then raised AttributeError on `True.startswith` (found by the
    hostile fuzzing: a key swapped for `true`)."""
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = {"model": {key: other.weight.detach(), "bias": other.bias.detach()}}
    with pytest.raises(StateMismatchError, match=rf"has the key {key}, a {name}; a module's keys"):
        load_into({"model": model}, saved, strict=strict)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_load_hook_error_is_a_state_mismatch() -> None:
    """It was the hook's raw ValueError (only RuntimeError was translated)."""
    model = Small()

    def hook(*args: Any) -> None:
        raise ValueError("the hook refuses\nover two lines")

    model.register_load_state_dict_pre_hook(hook)
    with pytest.raises(
        StateMismatchError, match=r'cannot load state\["model"\]: ValueError: the hook refuses$'
    ):
        load_into({"model": model}, {"model": Small().state_dict()})


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_per_parameter_state_tables_fit_torchs_optimizers(name: str) -> None:
    """PARAM_SHAPED keys have their parameter's shape; SCALARS keys are one number."""
    model = Net()
    optimizer = OPTIMIZERS[name](model.parameters())
    for _ in range(2):
        train_step(model, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    seen = set()
    for param, per_param in optimizer.state.items():
        for key, value in per_param.items():
            seen.add(key)
            if key in PARAM_SHAPED:
                assert value.shape == param.shape, (key, value.shape)
            if key in SCALARS:
                assert value.dim() == 0, key
            if name != "LBFGS" and isinstance(value, torch.Tensor) and value.dim() == 0:
                assert key in SCALARS, key
            if name != "Adafactor" and isinstance(value, torch.Tensor) and value.dim() > 0:
                assert key in PARAM_SHAPED or name == "LBFGS", key
    assert seen and params


def test_grad_scaler_saved_disabled_is_a_state_mismatch() -> None:
    saved = save_and_reload({"scaler": torch.amp.GradScaler("cpu", enabled=False)})
    with pytest.raises(
        StateMismatchError, match=r"state\[\"scaler\"\].*source state dict is empty"
    ):
        load_into({"scaler": torch.amp.GradScaler("cpu")}, saved)


# -- tensors, arrays and values --------------------------------------------------------------


def test_tensors_are_updated_in_place() -> None:
    weight = torch.zeros(3, requires_grad=True)
    state: dict[str, Any] = {"w": weight}
    load_into(state, {"w": torch.arange(3.0)})
    assert state["w"] is weight
    assert torch.equal(weight.detach(), torch.arange(3.0))
    assert weight.requires_grad


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        (
            torch.zeros(4),
            r"the state has shape \(3,\) and dtype torch.float32, the checkpoint "
            r"shape \(4,\) and dtype torch.float32",
        ),
        (torch.zeros(3, dtype=torch.int64), r".*the checkpoint shape \(3,\) and dtype torch.int64"),
        (np.zeros(3, dtype=np.float32), "it is a torch.Tensor but the checkpoint holds a numpy"),
        ([0.0, 0.0, 0.0], "it is a torch.Tensor but the checkpoint holds a list"),
    ],
)
def test_tensor_mismatches_are_refused(saved: Any, message: str) -> None:
    with pytest.raises(StateMismatchError, match=r"cannot load into state\[\"w\"\]: " + message):
        load_into({"w": torch.ones(3)}, {"w": saved})


def test_numpy_arrays_are_updated_in_place_or_replaced_when_read_only() -> None:
    array = np.zeros(3)
    readonly = np.zeros(2)
    readonly.flags.writeable = False
    state: dict[str, Any] = {"a": array, "r": readonly}
    load_into(state, {"a": np.arange(3.0), "r": np.ones(2)})
    assert state["a"] is array
    np.testing.assert_array_equal(array, np.arange(3.0))
    np.testing.assert_array_equal(state["r"], np.ones(2))
    with pytest.raises(StateMismatchError, match=r"the state has shape \(3,\) and dtype float64"):
        load_into({"a": array}, {"a": np.zeros(3, dtype=np.float32)})


def test_plain_values_are_replaced_whatever_their_type() -> None:
    state: dict[str, Any] = {"epoch": 0, "note": None, "t": "not a tensor"}
    load_into(state, {"epoch": 7, "note": {"a": (1,)}, "t": torch.ones(1)})
    assert state["epoch"] == 7 and state["note"] == {"a": (1,)}
    assert isinstance(state["t"], torch.Tensor)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([], {}), {}, "state must be a mutable mapping of names, got list"),
        (({}, [1]), {}, "saved must be a mapping of names, got list"),
        (({}, {}), {"strict": "yes"}, "strict must be True or False, got 'yes'"),
    ],
)
def test_bad_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        load_into(*args, **kwargs)


# -- the one resume test that matters --------------------------------------------------------


def _make_run() -> dict[str, Any]:
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=10)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0}


def _train(run: dict[str, Any], steps: int) -> None:
    for _ in range(steps):
        train_step(run["model"], run["optimizer"])
        run["scheduler"].step()
        run["step"] += 1


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resume_matches_training_straight_through() -> None:
    _seed(0)
    straight = _make_run()
    _train(straight, 8)

    _seed(0)
    first = _make_run()
    _train(first, 4)
    saved = save_and_reload({**first, "rng": capture_rng()})

    _seed(123)  # a new process: other initial weights, other random state
    resumed = _make_run()
    rng = saved.pop("rng")
    assert load_into(resumed, saved) == LoadReport()
    restore_rng(rng)
    _train(resumed, 4)

    assert resumed["step"] == straight["step"] == 8
    for name in ("model", "optimizer", "scheduler"):
        assert_same(resumed[name].state_dict(), straight[name].state_dict(), name)


def _claims(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    flat = flatten_state(state)
    return flat.tree, {k: (tuple(t.shape), t.dtype) for k, t in flat.tensors.items()}


def test_claims_give_the_mismatch_errors_of_a_load_before_reading() -> None:
    """`check_claims` on meta placeholders raises what `load_into` raises once the tensors are
    read, for modules, optimizers' per-parameter state, tensors and numpy arrays."""
    big = nn.Linear(4, 2)
    optimizer = torch.optim.Adam(big.parameters())
    big(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    saved = {"model": big, "opt": optimizer, "t": torch.zeros(5), "a": np.zeros(3, np.int16)}
    tree, claims = _claims(saved)
    claimed = claimed_state(tree, claims)
    assert claimed["model"]["weight"].is_meta and claimed["a"].dtype == np.int16
    small = nn.Linear(3, 2)
    cases = [
        {"model": small},
        {"opt": torch.optim.Adam(small.parameters())},
        {"t": torch.zeros(4)},
        {"a": np.zeros(3, np.int32)},
        {"missing": 1},
    ]
    for live in cases:
        values = unflatten_state(tree, flatten_state(saved).tensors)
        with pytest.raises(StateMismatchError) as after:
            load_into(live, values)
        with pytest.raises(StateMismatchError) as before:
            check_claims(live, tree, claims)
        assert str(before.value) == str(after.value)
    check_claims({"missing": 1}, tree, claims, strict=False)  # to the report, as in a load
    live_opt = torch.optim.Adam(big.parameters())
    check_claims({"model": big, "opt": live_opt}, tree, claims)  # a step is a claim: unchecked
