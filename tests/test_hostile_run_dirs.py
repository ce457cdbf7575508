"""Crafted run directories (manifests with valid checksums: xxh3 is no signature): every
read (`restore`, `ls`, `show`, `show --json`, `verify`) gives a `CheckpointError` naming the
field, or falls back to the next intact checkpoint; never another exception."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.errors import CorruptCheckpointError, StateMismatchError

# benchmarks/hostile.py crafts the manifests: `seal` gives one a valid checksum
_spec = importlib.util.spec_from_file_location(
    "hostile", Path(__file__).parent.parent / "benchmarks" / "hostile.py"
)
assert _spec is not None and _spec.loader is not None
hostile = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = hostile  # its dataclasses look their module up
_spec.loader.exec_module(hostile)
seal = hostile.seal
make_run = hostile.make_run
manifest_path = hostile.manifest_path


def craft(run: Path, step: int, change: Callable[[dict[str, Any]], None]) -> None:
    path = manifest_path(run, step)
    body = json.loads(path.read_bytes())
    change(body)
    path.write_bytes(seal(body))


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
        _set(lambda body: body, "time", 1e300),
        r"time 1e\+300 is not a unix time",
        id="time-1e300",
    ),
    pytest.param(
        _set(lambda body: body, "metrics", {"val_loss": 10**400}),
        r"metric 'val_loss'.* is not a number",
        id="metric-int-of-400-digits",
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


def _numpy_key(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        pairs = body["tree"]["__rng__"]["content"]["items"]
        state = next(v for k, v in pairs if k == "numpy")
        stack = [state]
        while stack:  # the first tensor reference in it: the key array
            node = stack.pop()
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                if isinstance(child, dict) and "__tensor__" in child:
                    node[key] = value
                    return
                if isinstance(child, (dict, list)):
                    stack.append(child)

    return change


@pytest.mark.parametrize(
    ("change", "generator"),
    [(_rng_int(2**64), "python"), (_rng_int(-1), "python"), (_numpy_key(0), "numpy")],
    ids=["python-beyond-32-bits", "python-negative", "numpy-key-a-number"],
)
def test_a_crafted_random_state_is_passed_over_like_damaged_tensors(
    run: Path, change: Any, generator: str
) -> None:
    """Checked while the checkpoint is chosen, so restore falls back (it raised after the
    model was loaded before: OverflowError from `random.setstate`, IndexError from NumPy)."""
    craft(run, 2, change)
    model = torch.nn.Linear(3, 2)
    message = rf"random state saved in step 2 \(__rng__\) is damaged.*{generator}"
    with pytest.warns(UserWarning, match=message):
        info = Checkpointer(run, read_only=True).restore({"model": model}, strict=False)
    assert info is not None and info.step == 1


def _adam_state(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        content = body["tree"]["optimizer"]["content"]
        pairs = content["items"] if "items" in content else list(content.items())
        state = next(v for k, v in pairs if k == "state")
        first = state["items"][0] if "items" in state else next(iter(state))
        first[1] = value  # the state of the first parameter

    return change


@pytest.mark.parametrize("value", [True, 3, "s"])
def test_a_crafted_optimizer_state_is_a_state_mismatch(run: Path, value: Any) -> None:
    """It was an AttributeError from torch's `Optimizer.load_state_dict`."""
    craft(run, 2, _adam_state(value))
    model = torch.nn.Linear(3, 2)
    state = {"model": model, "optimizer": torch.optim.Adam(model.parameters())}
    with pytest.raises(StateMismatchError, match="'state' is not an object of per-parameter"):
        Checkpointer(run, read_only=True).restore(state, 2)


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
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize(("change", "message"), CRAFTED)
def test_ls_and_verify_report_the_crafted_step(
    run: Path, change: Any, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    craft(run, 2, change)
    assert main(["ls", str(run)]) == 0
    assert main(["verify", str(run)]) != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err


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
    inside = str(run) + os.sep
    outside = [
        (event, path)
        for event, path, writes in touched
        if not (path + os.sep).startswith(inside)
        and (writes or not path.startswith(_LIBRARIES))
        and path not in ("/etc/localtime", "/dev/null")
    ]
    assert not outside, outside
