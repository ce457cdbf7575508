"""Crafted run directories (manifests with valid checksums: xxh3 is no signature): every
read (`restore`, `ls`, `show`, `show --json`, `verify`) gives a `CheckpointError` naming the
field, or falls back to the next intact checkpoint; never another exception."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crafted import hostile
from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.errors import CorruptCheckpointError, StateMismatchError, UnreadableCheckpointError
from haltpoint.store.hashing import hash_bytes

# benchmarks/hostile.py crafts the manifests: `seal` gives one a valid checksum
seal = hostile.seal
make_run = hostile.make_run
manifest_path = hostile.manifest_path


def craft(run: Path, step: int, change: Callable[[dict[str, Any]], None]) -> None:
    path = manifest_path(run, step)
    body = json.loads(path.read_bytes())
    change(body)
    path.write_bytes(seal(body))


def colliding(count: int) -> list[Any]:
    """`count` distinct ints of one hash (ints hash modulo 2**61 - 1, alike on every run),
    tagged as `encode_value` tags ints beyond 64 bits."""
    return [{"__hp__": "int", "v": hex(k * (2**61 - 1))} for k in range(count)]


def nest(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _set(where: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: Any) -> Any:
    def change(body: dict[str, Any]) -> None:
        where(body)[key] = value

    return change


def _set_value(key: str, value: Any) -> Any:
    """Set `values[key]`: hostile.make_run's values dict is stored as [key, value] pairs."""

    def change(body: dict[str, Any]) -> None:
        pairs = body["tree"]["values"]["content"]["items"]
        for pair in pairs:
            if pair[0] == key:
                pair[1] = value
                return
        pairs.append([key, value])

    return change


def _model(body: dict[str, Any]) -> dict[str, Any]:
    return body["tree"]["model"]  # type: ignore[no-any-return]


def _python_rng(body: dict[str, Any]) -> dict[str, Any]:
    pairs = body["tree"]["__rng__"]["content"]["items"]
    return next(value for key, value in pairs if key == "python")  # type: ignore[no-any-return]


def _rng_int(value: int) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        _python_rng(body)["items"][1]["items"][0] = value

    return change


CRAFTED = [
    pytest.param(
        _set_value("device", {"__hp__": "torch.device", "v": "bogus:99999999999"}),
        r'tree\["values"\]\["content"\]\["device"\].*not a device string',
        id="bad-device",
    ),
    pytest.param(
        _set_value("device", {"__hp__": "torch.device", "v": "quantum"}),
        r'\["device"\].*Expected one of cpu',
        id="unknown-device-type",
    ),
    pytest.param(
        _set_value("scale", {"__hp__": "numpy", "dtype": "int8", "v": 1000}),
        r'\["scale"\].*1000 is outside the range of int8',
        id="int8-of-1000",
    ),
    pytest.param(
        _set_value("scale", {"__hp__": "numpy", "dtype": "float16", "v": 1e300}),
        r'\["scale"\].*outside the range of float16',
        id="float16-of-1e300",
    ),
    pytest.param(
        _set_value("scale", {"__hp__": "numpy", "dtype": "uint8", "v": "7"}),
        r'\["scale"\].*holds a int, not a str',
        id="numpy-of-a-string",
    ),
    pytest.param(
        _set_value("deep", nest(900)),
        r"tree\['values'\] nests containers deeper than 100 levels",
        id="tree-900-deep",
    ),
    pytest.param(
        _set(lambda body: body, "extra", {"deep": nest(900)}),
        r"extra\['deep'\] nests containers deeper than 100 levels",
        id="extra-900-deep",
    ),
    pytest.param(
        _set(lambda body: body["extra"], "sequence", -1),
        r"extra\['sequence'\] must be an int in \[0, 2\*\*63\)",
        id="sequence-negative",
    ),
    pytest.param(
        _set(lambda body: body["extra"], "sequence", "9"),
        r"extra\['sequence'\] must be an int in \[0, 2\*\*63\).*got '9'",
        id="sequence-a-string",
    ),
    pytest.param(
        _set_value("deep", nest(80)),
        r"containers nest deeper than 64 levels",
        id="tree-80-deep",
    ),
    pytest.param(
        _set(_model, "metadata", [1, 2]),
        r'tree\["model"\]\["metadata"\].*module metadata must be an object',
        id="metadata-a-list",
    ),
    pytest.param(
        _set(_model, "metadata", {"": {"version": "one"}}),
        r'tree\["model"\]\["metadata"\]\[""\].*an int .version.',
        id="metadata-version-a-string",
    ),
    pytest.param(
        _set(_model, "metadata", {"": 3}),
        r'tree\["model"\]\["metadata"\]\[""\].*maps module names to objects',
        id="metadata-not-an-object",
    ),
    pytest.param(
        _set(_model, "container", "list"),
        r'tree\["model"\]\["container"\].*only .OrderedDict.',
        id="unknown-container",
    ),
    pytest.param(
        _set(_model, "kind", 7),
        r'tree\["model"\].*expected an object with .kind.',
        id="kind-an-int",
    ),
    pytest.param(
        _set(lambda body: body["tree"], "model", "weights"),
        r'tree\["model"\].*expected an object',
        id="entry-a-string",
    ),
    pytest.param(
        _set_value("size", {"__hp__": "torch.Size", "items": [2**64]}),
        r'\["size"\].*does not fit in 64 bits',
        id="size-beyond-int64",
    ),
    pytest.param(
        _set_value("dtype", {"__hp__": "torch.dtype", "v": "_C"}),
        r'\["dtype"\].*not the name of a torch dtype',
        id="dtype-a-module",
    ),
    pytest.param(
        _set_value("keys", {"__hp__": "set", "items": colliding(1000)}),
        r'\["keys"\].*1000 of its 1000 keys share one hash',
        id="set-of-colliding-ints",
    ),
    pytest.param(
        _set_value("keys", {"__hp__": "dict", "items": [[k, 0] for k in colliding(1000)]}),
        r'\["keys"\].*1000 of its 1000 keys share one hash',
        id="dict-of-colliding-keys",
    ),
    pytest.param(
        _set_value("plain", 2**64),
        r'\["plain"\].*an int of 65 bits written plain',
        id="untagged-int-of-65-bits",
    ),
    pytest.param(
        _set(lambda body: body, "time", 1e300),
        r"time 1e\+300 is not a unix time",
        id="time-1e300",
    ),
    pytest.param(
        _set(lambda body: body, "metrics", {"val_loss": 10**400}),
        r"metric 'val_loss'.* is not a number",
        id="metric-int-of-400-digits",
    ),
    pytest.param(
        _set(lambda body: body["tensors"]["model.bias"], "file", "step-000000002/\ud800.bin"),
        r"tensor 'model.bias'.*holds a character no file name can hold \(a lone surrogate\)",
        id="tensor-file-with-a-lone-surrogate",
    ),
    *(
        pytest.param(
            _set(lambda body: body["tensors"]["model.bias"], "file", file),
            rf"tensor 'model.bias' lives in '{re.escape(file)}', which is not a tensor file of",
            id=f"tensor-in-{name}",
        )
        for name, file in (
            ("a-dcp-shard", "step-000000002/dcp/__0_0.distcp"),
            ("the-history", "history.jsonl"),
            ("the-lock", "lock"),
            ("a-newer-step", "step-000000009/tensors.safetensors"),
            ("another-file-of-its-folder", "step-000000002/notes.safetensors"),
            ("a-numbered-name-with-a-leading-zero", "step-000000002/tensors-01.safetensors"),
        )
    ),
]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    make_run(tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(("change", "message"), CRAFTED)
def test_restore_names_the_field_and_falls_back(run: Path, change: Any, message: str) -> None:
    craft(run, 2, change)
    model = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match=message):
        info = Checkpointer(run, read_only=True).restore({"model": model}, strict=False)
    assert info is not None and info.step == 1
    with pytest.raises(CorruptCheckpointError, match=message):
        Checkpointer(run, read_only=True).restore({"model": model}, 2)


def _rng_part(name: str) -> Callable[[dict[str, Any]], Any]:
    def part(body: dict[str, Any]) -> Any:
        pairs = body["tree"]["__rng__"]["content"]["items"]
        return next(value for key, value in pairs if key == name)

    return part


def _numpy_field(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set a field of the saved NumPy state: `key` and `pos` are in its inner "state"."""

    def change(body: dict[str, Any]) -> None:
        numpy = _rng_part("numpy")(body)
        fields = {k: v for k, v in numpy["items"]}
        if name in ("key", "pos"):
            fields["state"][name] = value
        else:
            next(pair for pair in numpy["items"] if pair[0] == name)[1] = value

    return change


def _python_field(index: int, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set the version (0), a word (1, the first) or the cached Gaussian (2) of Python's state."""

    def change(body: dict[str, Any]) -> None:
        python = _rng_part("python")(body)["items"]
        if index == 1:
            python[1]["items"][0] = value
        else:
            python[index] = value

    return change


def _drop_python_word(body: dict[str, Any]) -> None:
    del _rng_part("python")(body)["items"][1]["items"][0]


def _python_position(value: int) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        _rng_part("python")(body)["items"][1]["items"][-1] = value

    return change


def _cuda(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body["tree"]["__rng__"]["content"]["items"].append(["cuda", value])

    return change


def _torch_state(key: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        _rng_part("torch")(body)["__tensor__"] = key

    return change


CRAFTED_RNG = [
    pytest.param(
        _rng_int({"__hp__": "int", "v": hex(2**64)}), "python", id="python-beyond-64-bits"
    ),
    pytest.param(_rng_int(2**40), "python.*ints in \\[0, 2\\*\\*32\\)", id="python-beyond-32-bits"),
    pytest.param(_rng_int(-1), "python", id="python-negative"),
    pytest.param(_drop_python_word, "python.*625 ints", id="python-624-words"),
    pytest.param(_python_position(625), "python.*position", id="python-position-625"),
    pytest.param(_python_field(0, 2), "python.*version 3", id="python-version-2"),
    pytest.param(_python_field(2, "x"), "python.*Gaussian", id="python-gaussian-a-string"),
    pytest.param(_numpy_field("key", 0), "numpy", id="numpy-key-a-number"),
    pytest.param(
        _numpy_field("key", {"__tensor__": "model.weight", "numpy": "<f4"}),
        "numpy.*integer array",
        id="numpy-key-of-floats",
    ),
    pytest.param(
        _numpy_field("key", {"__tensor__": "optimizer.state.0.exp_avg", "numpy": "<f4"}),
        "numpy.*integer array",
        id="numpy-key-of-6-floats",
    ),
    pytest.param(_numpy_field("pos", -1), "numpy.*position", id="numpy-position-negative"),
    pytest.param(_numpy_field("pos", 10**6), "numpy.*position", id="numpy-position-1e6"),
    pytest.param(_numpy_field("has_gauss", 5), "numpy.*has_gauss", id="numpy-has-gauss-5"),
    pytest.param(_numpy_field("bit_generator", "PCG64"), "numpy.*MT19937", id="numpy-pcg64"),
    pytest.param(_torch_state("model.weight"), "torch", id="torch-state-a-float-tensor"),
    pytest.param(_cuda([{"__tensor__": "__rng__.torch"}]), "cuda.*16 bytes", id="cuda-5056-bytes"),
    pytest.param(_cuda("x"), "cuda.*list of per-device", id="cuda-a-string"),
]


@pytest.mark.parametrize(("change", "generator"), CRAFTED_RNG)
def test_a_crafted_random_state_is_passed_over_like_damaged_tensors(
    run: Path, change: Any, generator: str
) -> None:
    """Checked while the checkpoint is chosen, so restore falls back (it raised after the
    model was loaded before: OverflowError from `random.setstate`, IndexError from NumPy; or
    restored a state truncated to 32 bits, or one NumPy reads out of its bounds)."""
    craft(run, 2, change)
    model = torch.nn.Linear(3, 2)
    message = rf"random state saved in step 2 \(__rng__\) is damaged.*{generator}"
    with pytest.warns(UserWarning, match=message):
        info = Checkpointer(run, read_only=True).restore({"model": model}, strict=False)
    assert info is not None and info.step == 1
    with pytest.raises(CorruptCheckpointError, match=message):
        Checkpointer(run, read_only=True).restore({"model": model}, 2)


@pytest.mark.parametrize(("change", "generator"), CRAFTED_RNG)
def test_verify_flags_a_crafted_random_state_as_restore_does(
    run: Path, change: Any, generator: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`verify` runs restore's own check of the random state (it passed all of these)."""
    craft(run, 2, change)
    assert main(["verify", str(run), "--json"]) == 1
    checks = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [c["status"] for c in checks] == ["intact", "damaged"]
    assert re.search(rf"random state saved in step 2 .*damaged.*{generator}", checks[1]["error"])


def _adam(body: dict[str, Any]) -> dict[str, Any]:
    """The saved Adam state dict: "state" and "param_groups"."""
    return {k: v for k, v in body["tree"]["optimizer"]["content"]["items"]}


def _adam_state(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        _adam(body)["state"]["items"][0][1] = value  # the state of the first parameter

    return change


def _adam_state_key(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        _adam(body)["state"]["items"][1][0] = value

    return change


def _adam_params(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        group = _adam(body)["param_groups"][0]["items"]
        next(pair for pair in group if pair[0] == "params")[1] = value

    return change


def _adam_value(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set `key` in the state of the first parameter (the weight, 2 x 3)."""

    def change(body: dict[str, Any]) -> None:
        per_param = _adam(body)["state"]["items"][0][1]["items"]
        next(pair for pair in per_param if pair[0] == key)[1] = value

    return change


def _adam_hyper(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        group = _adam(body)["param_groups"][0]["items"]
        next(pair for pair in group if pair[0] == key)[1] = value

    return change


def _untag_adam_state(body: dict[str, Any]) -> None:
    """The first parameter's state loses its dict tag: a JSON object holding "items"
    (found by the campaign: Adam's `__setstate__` raised after half the load, the model
    loaded before it)."""
    del _adam(body)["state"]["items"][0][1]["__hp__"]


def _live() -> dict[str, Any]:
    """A model and an Adam that has stepped, unlike the saved ones."""
    torch.manual_seed(5)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_adam_state(True), "'state' is not an object of per-parameter objects"),
        (_adam_state(3), "'state' is not an object of per-parameter objects"),
        (_adam_state("s"), "'state' is not an object of per-parameter objects"),
        (_adam_state_key(7), "'state' has the state of parameter 7, which no param"),
        (_adam_state_key(-1), "'state' has the state of parameter -1, which no param"),
        (_adam_state_key("1"), "'state' has the state of parameter '1', which no param"),
        (_adam_params([0, 0]), r"'param_groups'\[0\] repeats a parameter id"),
        (_adam_params(["0", 1]), r"'param_groups'\[0\] has no 'params' list of int ids"),
        (_adam_params([0]), "'state' has the state of parameter 1, which no param"),
    ],
    ids=[
        "state-true", "state-3", "state-a-string", "state-of-param-7", "state-of-param-minus-1",
        "state-key-a-string", "params-repeated", "params-a-string", "params-one-short",
    ],
)  # fmt: skip
def test_a_malformed_optimizer_state_is_passed_over_like_damaged_tensors(
    run: Path, change: Any, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its structure needs no live optimizer: checked while the checkpoint is chosen, so
    restore falls back, a refused step leaves the live objects untouched, verify flags it.
    (torch kept a stray state as junk, or raised its AttributeError.)"""
    craft(run, 2, change)
    state = _live()
    before = hostile.snapshot(state)
    damage = rf"optimizer state saved in step 2 \(optimizer\) is damaged: {message}"
    with pytest.raises(CorruptCheckpointError, match=damage) as refused:
        Checkpointer(run, read_only=True).restore(state, 2)
    assert "\n" not in str(refused.value)
    assert hostile.snapshot(state) == before
    with pytest.warns(UserWarning, match=damage):
        info = Checkpointer(run, read_only=True).restore(state)
    assert info is not None and info.step == 1
    assert main(["verify", str(run)]) == 1
    assert re.search(damage, capsys.readouterr().out.replace("\n  ", " "))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _adam_value("exp_avg", {"__tensor__": "optimizer.state.1.exp_avg"}),
            r"holds exp_avg of shape \(2,\), the parameter has shape \(2, 3\)",
        ),
        (_adam_value("exp_avg_sq", 0.5), "holds exp_avg_sq as a float, not a tensor"),
        (_adam_value("step", "s"), "holds step as a str, not a number"),
        (
            _adam_value("step", {"__tensor__": "optimizer.state.0.exp_avg"}),
            r"holds step of shape \(2, 3\), not one number",
        ),
        (_untag_adam_state, r"into a torch.optim.adam.Adam: KeyError: 'step'"),
        (_adam_hyper("lr", "fast"), r"parameter group 0 has lr=0.5, the checkpoint lr='fast'"),
        (_adam_hyper("amsgrad", 1), "has amsgrad=False, the checkpoint amsgrad=1"),
        (
            _adam_hyper("betas", {"__hp__": "tuple", "items": [0.9]}),
            r"betas=\(0.9, 0.999\), the checkpoint betas=\(0.9,\)",
        ),
        (
            _adam_hyper("lr", {"__hp__": "tuple", "items": [{"__hp__": "int", "v": "f" * 4000}]}),
            "lr=0.5, the checkpoint lr=<a tuple holding an int too long to print>",
        ),
        (
            _adam_hyper("lr", {"__hp__": "int", "v": "f" * 4000}),
            "lr=0.5, the checkpoint lr=<an int of 16000 bits, too long to print>",
        ),
    ],
    ids=[
        "exp-avg-of-the-bias", "exp-avg-sq-a-float", "step-a-string", "step-a-matrix",
        "state-untagged", "lr-a-string", "amsgrad-an-int", "betas-of-one",
        "lr-a-tuple-of-an-int-of-4800-digits", "lr-an-int-of-4800-digits",
    ],
)  # fmt: skip
def test_an_optimizer_state_that_does_not_fit_is_refused_before_anything_loads(
    run: Path, change: Any, message: str
) -> None:
    """Checked against the live optimizer before the first byte is copied: the model and the
    optimizer are left as they were. (torch loaded these; the step raised, or a string `step`
    raised from Adam's `__setstate__` after the model and half the optimizer were loaded.)"""
    craft(run, 2, change)
    state = _live()
    before = hostile.snapshot(state)
    for which in (2, "latest"):  # a mismatch with the live objects: no fall-back
        with pytest.raises(StateMismatchError, match=message) as refused:
            Checkpointer(run, read_only=True).restore(state, which)
        assert "\n" not in str(refused.value)
        assert hostile.snapshot(state) == before
    assert main(["verify", str(run)]) == 0  # the checkpoint itself is sound


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
@pytest.mark.parametrize(("change", "message"), CRAFTED)
def test_show_names_the_field_in_one_line(
    run: Path, change: Any, message: str, json_flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    craft(run, 2, change)
    code = main(["show", str(run), "--step", "2", *json_flag])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3, err
    assert re.search(message, err), err


@pytest.mark.parametrize(("change", "message"), CRAFTED)
def test_ls_and_verify_report_the_crafted_step(
    run: Path, change: Any, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    craft(run, 2, change)
    assert main(["ls", str(run)]) == 0
    assert main(["verify", str(run)]) != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize("alias", ["step-0000000002", "step-" + "\u0660" * 8 + "\u0662"])
def test_a_folder_named_like_another_step_is_no_checkpoint(
    run: Path, alias: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(run / "step-000000002", run / alias)  # ten digits, or Arabic-Indic ones
    assert main(["ls", str(run), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["step"], Path(e["path"]).name) for e in listed] == [
        (1, "step-000000001"),
        (2, "step-000000002"),
    ]


# -- fuzzing: random mutations of a real manifest, sealed with a valid checksum ----------------


_touched: list[tuple[str, str, bool]] | None = None  # (event, path, writes) while fuzzing
_WRITES = ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.symlink")
_READS = ("os.listdir", "os.scandir")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _touched is None or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    if event == "open":
        mode, flags = args[1], args[2]
        writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        _touched.append((event, os.path.abspath(os.fsdecode(args[0])), bool(writes)))
    elif event in _WRITES or event in _READS:
        _touched.append((event, os.path.abspath(os.fsdecode(args[0])), event in _WRITES))


sys.addaudithook(_audit)
_LIBRARIES = tuple(
    os.path.abspath(p) + os.sep
    for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path, "/usr", "/proc", "/sys"}
    if p and os.path.isabs(p) and not os.path.abspath(p).startswith(tempfile.gettempdir())
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "run"
    hostile.make_run(path)
    return path


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutation=st.sampled_from(sorted(hostile.MUTATIONS)),
    rng=st.randoms(use_true_random=False),
    times=st.integers(1, 3),
)
def test_fuzzed_manifests_give_checkpoint_errors_and_stay_inside_the_run(
    pristine: Path, mutation: str, rng: Any, times: int
) -> None:
    global _touched
    run = Path(tempfile.mkdtemp(dir=pristine.parent)) / "run"
    shutil.copytree(pristine, run)
    hostile.craft(run, mutation, rng, times)
    _touched = []
    try:
        outcomes = hostile.read_everything(run)
    finally:
        touched, _touched = _touched, None
    shutil.rmtree(run.parent)
    assert not [o for o in outcomes.values() if o.startswith("BUG")], outcomes
    assert hostile.disagreement(outcomes) is None, outcomes
    inside = str(run) + os.sep
    outside = [
        (event, path)
        for event, path, writes in touched
        if not (path + os.sep).startswith(inside)
        and (writes or not path.startswith(_LIBRARIES))
        and path not in ("/etc/localtime", "/dev/null")
    ]
    assert not outside, outside


def _record(key: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    """Change the manifest's record of tensor `key`; its bytes keep hashing right."""

    def change(body: dict[str, Any]) -> None:
        body["tensors"][key].update(fields)

    return change


def _borrow(key: str, other: str) -> Callable[[dict[str, Any]], None]:
    """Point `key`'s record at `other`'s bytes (same size), with `other`'s hash."""

    def change(body: dict[str, Any]) -> None:
        theirs = body["tensors"][other]
        body["tensors"][key].update(offset=theirs["offset"], hash=theirs["hash"])

    return change


RECORD_VS_HEADER = [
    pytest.param(_record("model.weight", dtype="I32"), "dtype I32", id="dtype-of-the-same-width"),
    pytest.param(_record("model.weight", shape=[3, 2]), r"shape \[3, 2\]", id="shape-transposed"),
    pytest.param(_record("model.bias", shape=[1, 2]), r"shape \[1, 2\]", id="shape-reshaped"),
    pytest.param(
        _borrow("model.weight", "optimizer.state.0.exp_avg"),
        "bytes 808",
        id="another-tensors-bytes",
    ),
]


@pytest.mark.parametrize(("change", "message"), RECORD_VS_HEADER)
def test_a_record_that_disagrees_with_its_file_header_is_damage_to_every_reader(
    run: Path, change: Any, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bytes hash right (xxh3 is no signature), so only the file's own header tells:
    restore, verify and export all refuse the step; restore falls back."""
    craft(run, 2, change)
    file = "step-000000002/tensors.safetensors"
    damage = rf"{file}: [^;]*manifest records [^;]*{message}.*header says"
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CorruptCheckpointError, match=damage) as refused:
        Checkpointer(run, read_only=True).restore({"model": model}, 2)
    assert "\n" not in str(refused.value)
    with pytest.warns(UserWarning, match=damage):
        info = Checkpointer(run, read_only=True).restore({"model": model}, strict=False)
    assert info is not None and info.step == 1
    assert main(["verify", str(run), "--json"]) == 1
    checks = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [c["status"] for c in checks] == ["intact", "damaged"]
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--which", "2", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert re.search(damage, err) and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    assert main(["ls", str(run)]) == 0  # ls reads no tensor file


# -- reads that took time quadratic in what a crafted run holds, or failed on its way ----------


class _Overdue(BaseException):
    """Raised by `_deadline`: no `except Exception` of the code under test (the command line's
    error boundary) turns it into an ordinary failure."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fail the test, instead of hanging it, when the block runs longer than `seconds`."""

    def expire(signum: int, frame: Any) -> None:
        raise _Overdue(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_keys_crafted_to_share_one_hash_are_refused_in_linear_time(run: Path) -> None:
    """100,000 ints of one hash in a set: building it took time quadratic in their number (50 s
    here, in every read of the manifest, `ls` too; days for the millions a manifest may hold)."""
    craft(run, 2, _set_value("keys", {"__hp__": "set", "items": colliding(100_000)}))
    model = torch.nn.Linear(3, 2)
    with _deadline(30):
        assert main(["ls", str(run)]) == 0
        with pytest.warns(UserWarning, match="share one hash"):
            info = Checkpointer(run, read_only=True).restore({"model": model}, strict=False)
    assert info is not None and info.step == 1


def test_a_manifest_of_300000_metric_names_is_read_in_linear_time(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ls`, `export --which best` and `gc --keep-best` gathered the metric names in a list,
    testing each against all before it (a manifest may hold millions: hours)."""
    craft(run, 2, _set(lambda body: body, "metrics", {f"m{i}": 0.5 for i in range(300_000)}))
    out = tmp_path / "m.safetensors"
    with _deadline(60):
        assert main(["ls", str(run)]) == 0
        best = ["--which", "best", "--monitor", "m7", "--mode", "min"]
        assert main(["export", str(run), *best, "-o", str(out)]) == 0
    assert "from step 2" in capsys.readouterr().out


def test_a_history_of_50000_metric_names_is_replayed_in_linear_time(run: Path) -> None:
    """`plot` and `replay` gathered the names in a list, then walked every step for each name:
    names x steps (2.5 billion here)."""
    lines = [
        json.dumps(body, separators=(",", ":"))
        for body in ({"step": i, "metrics": {f"m{i}": 0.5}} for i in range(50_000))
    ]
    (run / "history.jsonl").write_text(
        "".join(f'{line[:-1]},"checksum":"{hash_bytes(line.encode())}"}}\n' for line in lines)
    )
    with _deadline(60):
        assert main(["replay", str(run), "--metric", "m7", "--mode", "min"]) == 0


@pytest.mark.parametrize("kind", ["file", "fifo", "link-to-dev-null"])
def test_a_run_directory_that_is_no_folder_is_refused_not_read_as_empty(
    tmp_path: Path, kind: str
) -> None:
    """A reader given a file, a FIFO or a device read it as an empty run: `list()` gave [] and
    `restore` None, so a script resumed from nothing, saying nothing."""
    path = tmp_path / "run"
    if kind == "file":
        path.write_text("notes")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(os.devnull)
    reader = Checkpointer(path, read_only=True)
    for read in (reader.list, lambda: reader.restore({"model": torch.nn.Linear(3, 2)})):
        with pytest.raises(UnreadableCheckpointError, match=rf"cannot list {path}: ") as raised:
            read()
        assert "\n" not in str(raised.value)


def test_a_dcp_file_name_no_file_system_can_hold_is_damage(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sharded record naming a DCP file `\\ud800` (a lone surrogate, valid JSON): the open
    raised `UnicodeEncodeError` from `restore`, 'latest' included, instead of falling back."""
    (run / "step-000000002" / "dcp").mkdir()
    files = {"\ud800": {"size": 3, "xxh3_128": hash_bytes(b"abc")}}
    record = {"world_size": 1, "entries": ["model"], "files": files}
    craft(run, 2, _set(lambda body: body["extra"], "sharded", record))
    damage = r"holds a character no file name can hold \(a lone surrogate\)"
    with pytest.raises(CorruptCheckpointError, match=damage):
        Checkpointer(run, read_only=True).restore({"model": torch.nn.Linear(3, 2)}, 2)
    with pytest.warns(UserWarning, match=damage):
        info = Checkpointer(run, read_only=True).restore({"model": torch.nn.Linear(3, 2)})
    assert info is not None and info.step == 1
    assert main(["verify", str(run), "--json"]) == 1
    checks = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [c["status"] for c in checks] == ["intact", "damaged"]


def test_a_damaged_checkpoint_passed_over_from_python_c_is_a_warning(run: Path) -> None:
    """From `python -c`, stdin or the REPL, whose `__main__` has BuiltinImporter for loader,
    the warning of the fall-back raised `ImportError: '__main__' is not a built-in module`
    (warnings asked that loader for the line's source)."""
    craft(run, 2, _set(lambda body: body, "time", 1e300))
    script = (
        "import torch; from haltpoint import Checkpointer; "
        f"info = Checkpointer({str(run)!r}, read_only=True).restore("
        "{'model': torch.nn.Linear(3, 2)}, strict=False); print(info.step)"
    )
    src = str(Path(importlib.util.find_spec("haltpoint").origin).parents[1])  # type: ignore[arg-type, union-attr]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1\n"
    assert "time 1e+300 is not a unix time" in done.stderr


# -- every command over every kind of hostile run directory: one line, no hang, no code run ----

_STEP = "step-000000002"  # make_run's newest step; step 1 stays intact


def _replace(run: Path, rel: str, make: Callable[[Path], None]) -> None:
    path = run / rel
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    make(path)


def _truncate(size: int) -> Callable[[Path], None]:
    def grow(path: Path) -> None:
        with open(path, "r+b") as f:
            f.truncate(size)  # sparse: no disk used

    return grow


def _append(data: bytes) -> Callable[[Path], None]:
    def add(path: Path) -> None:
        with open(path, "ab") as f:
            f.write(data)

    return add


def _checked(body: dict[str, Any]) -> str:
    line = json.dumps(body, separators=(",", ":"))
    return f'{line[:-1]},"checksum":"{hash_bytes(line.encode())}"}}\n'


def _odd_records(path: Path) -> None:
    lines = [{"step": 3, "time": 1.0, "metrics": {"val_loss": v}} for v in ("NaN", "-Infinity")]
    lines += [{"step": s, "time": 1.0, "metrics": {"val_loss": 1e308}} for s in (-1, 2**70, "4")]
    lines += [{"step": 5, "time": "x", "metrics": [1]}, {"step": 6, "stopper": {"best": [1]}}]
    with open(path, "a") as f:
        f.write("".join(_checked(body) for body in lines))


def _nested_folders(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(300):  # deeper than PATH_MAX allows to name from the top
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def _pickle_claimed_as_shards(run: Path) -> None:
    """A sharded record whose `.metadata` is a pickle that would create a file if run."""
    import pickle

    import xxhash

    class Payload:
        def __reduce__(self) -> Any:
            return (os.mkdir, (str(run.parent / "PWNED"),))

    data = pickle.dumps(Payload())
    (run / _STEP / "dcp").mkdir()
    (run / _STEP / "dcp" / ".metadata").write_bytes(data)
    files = {".metadata": {"size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}}
    record = {"world_size": 1, "entries": ["model"], "files": files}
    craft(run, 2, _set(lambda body: body["extra"], "sharded", record))


HOSTILE: dict[str, Callable[[Path], None]] = {
    "manifest-fifo": lambda r: _replace(r, f"{_STEP}/manifest.json", os.mkfifo),
    "manifest-folder": lambda r: _replace(r, f"{_STEP}/manifest.json", Path.mkdir),
    "manifest-link-out": lambda r: _replace(
        r, f"{_STEP}/manifest.json", lambda p: p.symlink_to("/etc/hostname")
    ),
    "manifest-3-GiB": lambda r: _truncate(3 << 30)(r / _STEP / "manifest.json"),
    "manifest-empty": lambda r: (r / _STEP / "manifest.json").write_bytes(b""),
    "manifest-binary": lambda r: (r / _STEP / "manifest.json").write_bytes(bytes(range(256))),
    "manifest-json-bomb": lambda r: (r / _STEP / "manifest.json").write_bytes(
        b"[" * 200_000 + b"]" * 200_000
    ),
    "tensors-fifo": lambda r: _replace(r, f"{_STEP}/tensors.safetensors", os.mkfifo),
    "tensors-folder": lambda r: _replace(r, f"{_STEP}/tensors.safetensors", Path.mkdir),
    "tensors-link-to-dev-zero": lambda r: _replace(
        r, f"{_STEP}/tensors.safetensors", lambda p: p.symlink_to("/dev/zero")
    ),
    "tensors-3-GiB": lambda r: _truncate(3 << 30)(r / _STEP / "tensors.safetensors"),
    "tensors-empty": lambda r: (r / _STEP / "tensors.safetensors").write_bytes(b""),
    "tensors-missing": lambda r: (r / _STEP / "tensors.safetensors").unlink(),
    "tensors-header-of-2**63": lambda r: (r / _STEP / "tensors.safetensors").write_bytes(
        (2**63).to_bytes(8, "little") + b"{}"
    ),
    "history-fifo": lambda r: _replace(r, "history.jsonl", os.mkfifo),
    "history-folder": lambda r: _replace(r, "history.jsonl", Path.mkdir),
    "history-link-out": lambda r: _replace(
        r, "history.jsonl", lambda p: p.symlink_to("/etc/hostname")
    ),
    "history-garbage": lambda r: _append(
        b"garbage\n\xff\xfe\x00\n{}\n[1,2]\nnull\n" + b"{" * 10_000 + b"\n"
    )(r / "history.jsonl"),
    "history-json-bomb": lambda r: _append(b"[" * 500_000 + b"]" * 500_000 + b"\n")(
        r / "history.jsonl"
    ),
    "history-8-MiB-line": lambda r: _append(b"x" * (8 << 20))(r / "history.jsonl"),
    "history-only-bad-bytes": lambda r: (r / "history.jsonl").write_bytes(b"\xff\xfe\n" * 1000),
    "history-nan-inf-odd-steps": lambda r: _odd_records(r / "history.jsonl"),
    "non-utf8-names": lambda r: (
        os.mkdir(os.path.join(os.fsencode(r), b"step-\xff\xfe")),
        (r / _STEP / os.fsdecode(b"\xff.safetensors")).write_bytes(b"x"),
    ),
    "folders-300-deep": lambda r: _nested_folders(r / _STEP),
    "step-link-out": lambda r: os.symlink("/etc", r / "step-000000009"),
    "step-link-in": lambda r: os.symlink(r / "step-000000001", r / "step-000000009"),
    "quarantine-file": lambda r: (r / "quarantine").write_text("x"),
    "quarantine-fifo": lambda r: os.mkfifo(r / "quarantine"),
    "quarantine-junk": lambda r: (
        (r / "quarantine").mkdir(),
        (r / "quarantine" / "step-000000002-1.json").write_bytes(b"junk"),
        os.mkfifo(r / "quarantine" / "step-000000003-1.json"),
    ),
    "lock-fifo": lambda r: _replace(r, ".haltpoint.lock", os.mkfifo),
    "lock-folder": lambda r: _replace(r, ".haltpoint.lock", Path.mkdir),
    "lock-binary": lambda r: (r / ".haltpoint.lock").write_bytes(b"\xff" * 100),
    "shards-claimed-by-a-pickle": _pickle_claimed_as_shards,
    "dcp-folder-of-junk": lambda r: (
        (r / _STEP / "dcp").mkdir(),
        (r / _STEP / "dcp" / ".metadata").write_bytes(b"\x80\x04junk"),
    ),
    "pinned-fifo": lambda r: os.mkfifo(r / _STEP / "pinned"),
    "2000-empty-step-folders": lambda r: [
        (r / f"step-{i:09d}").mkdir() for i in range(10, 2010)
    ],
}  # fmt: skip

COMMAND_LINES = [
    "ls {run}",
    "ls {run} --json",
    "show {run}",
    "show {run} --step 2 --json",
    "verify {run} --json",
    "export {run} -o {out}/m.safetensors",
    "export {run} --which 2 -o {out}/m.safetensors",
    "gc {run} --keep-last 1 --dry-run",
    "gc {run} --keep-last 1",
    "plot {run} -o {out}/c.png",
    "replay {run} --json",
    "replay {run}/history.jsonl",
    "import {out}/w.pt -o {run} --step 100",
]


@pytest.fixture(scope="module")
def hostile_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hostile-base")
    make_run(base / "run")
    torch.save({"w": torch.ones(2)}, base / "w.pt")
    return base


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "line", COMMAND_LINES, ids=lambda line: line.replace("{run}", "DIR").replace("{out}/", "")
)
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_every_command_on_a_hostile_run_is_one_line_and_never_hangs(
    hostile_base: Path, tmp_path: Path, kind: str, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each command ends at once with its result, or with one `haltpoint: error:` line
    (exit status 1 or 2), never a traceback or an "unexpected ... (a bug in haltpoint)"
    error; nothing from the run
    directory runs (a crafted pickle would create `PWNED`)."""
    run = tmp_path / "run"
    shutil.copytree(hostile_base / "run", run, symlinks=True)
    shutil.copy(hostile_base / "w.pt", tmp_path / "w.pt")
    HOSTILE[kind](run)
    argv = line.format(run=run, out=tmp_path).split()
    with _deadline(60):
        code = main(argv)
    err = capsys.readouterr().err
    errors = [text for text in err.splitlines() if text.startswith("haltpoint: error: ")]
    assert code in (0, 1, 2), err
    assert "Traceback" not in err and "a bug in haltpoint" not in err, err
    assert len(errors) <= 1 and (code != 2 or len(errors) == 1), err
    assert not errors or err.splitlines()[-1] == errors[0], err
    assert not (tmp_path / "PWNED").exists()
