"""Crafted manifests with valid checksums (xxh3 is no signature), and what every read makes of them.

    python benchmarks/reliability.py hostile --trials 200

A real run of two checkpoints (a model, its Adam state, tagged values, a NumPy scalar, a
device, the random state) is copied for each trial, and the newest manifest is mutated by one
class of change, then sealed with a valid checksum. `restore` (latest, and the step itself) and
the `ls`, `verify`, `show` and `show --json` commands must each succeed or raise a
`CheckpointError`, never another exception; `restore` must fall back to the intact step, a
refused restore must leave the live model and optimizer as they were, and `verify` must flag
every step that `restore` refuses as damaged. `tests/test_hostile_run_dirs.py` drives the
same mutations with hypothesis.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from haltpoint import Checkpointer, CheckpointError
from haltpoint.cli.app import build_parser
from haltpoint.cli.output import Output
from haltpoint.store.hashing import hash_bytes

CRAFTED_STEP, INTACT_STEP = 2, 1
_STRINGS = (
    "", "F99", "F32", "I8", "BOOL", "float128", "object", "O", "V8", "<U4", "complex32",
    "int8", "float16", "uint64", "cpu", "cuda:99999999999", "bogus", "__class__", "_C",
    "OrderedDict", "dict", "tuple", "torch.dtype", "torch.device", "torch.Size", "numpy",
    "../../etc/passwd", "/abs", "step-000000001/tensors.safetensors", "model.weight", "\x1b[2J",
)  # fmt: skip
_NUMBERS = (-1, 0, 1, -(2**63) - 1, 2**63, 2**64, 10**30, 10**4000, 1e308, -1e308, 0.5, 1000)
_TAGS = ("float", "int", "complex", "bytes", "bytearray", "torch.dtype", "torch.device")
_TAGS += ("numpy", "tuple", "set", "frozenset", "dict", "OrderedDict", "torch.Size", "bogus")
_KEYS = ("__hp__", "__tensor__", "evil", "numpy", "container", "metadata", "items", "v", "dtype")


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(body: dict[str, Any]) -> bytes:
    """The manifest an attacker who knows the format writes for `body`."""
    body = {k: v for k, v in body.items() if k != "checksum"}
    return canonical({**body, "checksum": hash_bytes(canonical(body))}) + b"\n"


def make_run(path: Path) -> None:
    """Two checkpoints of a model, its Adam state, tagged values and the random state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    values = {"betas": (0.9, 0.99), "device": torch.device("cpu"), "scale": np.int8(3)}
    values |= {"big": 2**70, "dtype": torch.float16, "names": {"b", "a"}, "raw": b"\x00"}
    with Checkpointer(path, keep_last=5, async_save=False) as ckpt:
        for step in (INTACT_STEP, CRAFTED_STEP):
            state = {"model": model, "optimizer": optimizer, "values": values, "epoch": step}
            ckpt.save(step, state, {"val_loss": 1.0 / step})


def manifest_path(run: Path, step: int = CRAFTED_STEP) -> Path:
    return run / f"step-{step:09d}" / "manifest.json"


# -- mutations: each changes `body` in place, its choices drawn from `rng` ------------------------


def _nodes(value: Any) -> list[tuple[Any, Any, Any]]:
    """(container, key, value) for every value under `value`, in a fixed order."""
    found: list[tuple[Any, Any, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        pairs = sorted(item.items()) if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            found.append((item, key, child))
            if isinstance(child, (dict, list)):
                stack.append(child)
    return found


def _pick(body: dict[str, Any], rng: random.Random, want: Callable[[Any], bool]) -> Any:
    nodes = [n for n in _nodes(body) if want(n[2])] or _nodes(body)
    return rng.choice(nodes)


def nest(depth: int, rng: random.Random) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = rng.choice([[value], {"k": value}, {"__hp__": "tuple", "items": [value]}])
    return value


def _any_value(rng: random.Random) -> Any:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.choice(_NUMBERS)
    if kind == 1:
        return rng.choice(_STRINGS)
    if kind == 2:
        return rng.choice([None, True, False, [], {}])
    if kind == 3:
        return nest(rng.choice([3, 65, 99, 101, 150, 900]), rng)
    if kind == 4:
        return _tagged(rng)
    if kind == 5:
        return {"__tensor__": rng.choice(_STRINGS), "numpy": rng.choice(_STRINGS)}
    return [rng.choice(_NUMBERS), rng.choice(_STRINGS)]


def _tagged(rng: random.Random) -> dict[str, Any]:
    obj: dict[str, Any] = {"__hp__": rng.choice(_TAGS)}
    for key in rng.sample(("v", "items", "dtype", "b64"), rng.randint(0, 2)):
        obj[key] = rng.choice([*_NUMBERS, *_STRINGS, [], [1, 2], [[1, 2]], [0.5, 0.5]])
    return obj


def _set(node: tuple[Any, Any, Any], value: Any) -> None:
    parent, key, _ = node
    parent[key] = value


def swap_type(body: dict[str, Any], rng: random.Random) -> None:
    node = _pick(body, rng, lambda v: True)
    _set(
        node,
        rng.choice([v for v in (0, 0.5, "s", None, True, [], {}) if type(v) is not type(node[2])]),
    )


def huge_or_negative(body: dict[str, Any], rng: random.Random) -> None:
    _set(_pick(body, rng, lambda v: type(v) in (int, float)), rng.choice(_NUMBERS))


def deep_nesting(body: dict[str, Any], rng: random.Random) -> None:
    _set(_pick(body, rng, lambda v: True), nest(rng.choice([65, 99, 101, 150, 900]), rng))


def unknown_key(body: dict[str, Any], rng: random.Random) -> None:
    _, _, target = _pick(body, rng, lambda v: isinstance(v, dict))
    if isinstance(target, dict):
        target[rng.choice(_KEYS)] = _any_value(rng)


def removed_key(body: dict[str, Any], rng: random.Random) -> None:
    parent, key, _ = _pick(body, rng, lambda v: True)
    del parent[key]


def wrong_dtype_string(body: dict[str, Any], rng: random.Random) -> None:
    names = {"dtype", "numpy", "__hp__", "v", "container", "kind", "file"}
    nodes = [n for n in _nodes(body) if n[1] in names and isinstance(n[2], str)]
    _set(rng.choice(nodes), rng.choice(_STRINGS))


def crafted_value(body: dict[str, Any], rng: random.Random) -> None:
    _set(_pick(body, rng, lambda v: True), _any_value(rng))


def _pairs(tagged: Any) -> dict[Any, Any]:
    """The values of a tagged dict (``{"__hp__": "dict", "items": [[k, v], ...]}``) by key."""
    return {pair[0]: pair[1] for pair in tagged["items"]}


def _refs(value: Any) -> list[dict[str, Any]]:
    return [v for _, _, v in _nodes(value) if isinstance(v, dict) and "__tensor__" in v]


def crafted_optimizer(body: dict[str, Any], rng: random.Random) -> None:
    """One change of the Adam state that keeps it decodable: state keys, parameter ids,
    per-parameter values, hyper-parameters, the groups themselves."""
    content = _pairs(body["tree"]["optimizer"]["content"])
    state, groups = content["state"], content["param_groups"]
    tagged = [g for g in groups if isinstance(g, dict) and isinstance(g.get("items"), list)]
    group = rng.choice(tagged) if tagged else {"items": []}  # a change before may have left none
    kind = rng.randrange(6)
    if kind == 0 and state["items"]:  # a state for a parameter that is not there
        rng.choice(state["items"])[0] = rng.choice([2, 7, -1, 2**70, "0", True, 1, 0])
    elif kind == 1:  # the ids of a group's parameters
        params = next((p for p in group["items"] if p[0] == "params"), None)
        if params is not None:
            params[1] = rng.choice([[0], [0, 0], [0, 1, 2], [1, 0], ["0", 1], [0, 1.0], []])
    elif kind == 2 and _refs(state):  # a per-parameter tensor swapped for another
        ref = rng.choice(_refs(state))
        ref["__tensor__"] = rng.choice([r["__tensor__"] for r in _refs(body["tree"])])
    elif kind == 3 and state["items"]:  # a per-parameter value replaced
        per_param = rng.choice(state["items"])[1]
        rng.choice(per_param["items"])[1] = _any_value(rng)
    elif kind == 4 and group["items"]:  # a hyper-parameter replaced
        item = rng.choice([p for p in group["items"] if p[0] != "params"] or group["items"])
        item[1] = rng.choice([*_STRINGS[:4], *_NUMBERS, None, True, [], [0.9]])
    else:  # the groups themselves
        choice = rng.randrange(3)
        if choice == 0:
            groups.append(json.loads(json.dumps(group)))
        elif choice == 1:
            groups.clear()
        else:
            groups[:] = [rng.choice([0, "g", None, {"__hp__": "dict", "items": []}])]


def crafted_random_state(body: dict[str, Any], rng: random.Random) -> None:
    """One change of the saved random state that keeps it decodable: Python's version,
    words, position and cached Gaussian; NumPy's generator, key, position and Gaussian; the
    torch state's tensor; a CUDA state added."""
    parts = _pairs(body["tree"]["__rng__"]["content"])
    items = body["tree"]["__rng__"]["content"]["items"]
    python, numpy = parts["python"]["items"], _pairs(parts["numpy"])
    words = python[1]["items"]
    kind = rng.randrange(8)
    if kind == 0:
        python[0] = rng.choice([2, 4, 0, "3", None])
    elif kind == 1:
        index = rng.randrange(len(words))
        words[index] = rng.choice([2**32, 2**40, -1, 0.5, "x", None, 624, 625, 10**6])
    elif kind == 2:
        if rng.random() < 0.5:
            del words[rng.randrange(len(words))]
        else:
            words.append(1)
    elif kind == 3:
        python[2] = rng.choice(["x", 1, [], True, 1e308, {"__hp__": "tuple", "items": []}])
    elif kind == 4:
        key = rng.choice(["pos", "has_gauss", "gauss", "bit_generator"])
        value = rng.choice([-1, 624, 625, 10**6, 0.5, 5, "PCG64", "x", None, True])
        if key == "pos":
            numpy["state"]["pos"] = value
        else:
            next(p for p in parts["numpy"]["items"] if p[0] == key)[1] = value
    elif kind == 5:  # the NumPy key: another tensor, read as another dtype
        numpy["state"]["key"] = {
            "__tensor__": rng.choice(sorted(body["tensors"])),
            "numpy": rng.choice(["<u4", "<f4", "<i8", "|u1", "<i4"]),
        }
    elif kind == 6:  # the torch state: another tensor
        parts["torch"]["__tensor__"] = rng.choice(sorted(body["tensors"]))
    else:  # CUDA states
        refs = [{"__tensor__": k} for k in sorted(body["tensors"])]
        items.append(["cuda", rng.choice([[rng.choice(refs)], rng.choice(refs), [], "x", [1]])])


MUTATIONS: dict[str, Callable[[dict[str, Any], random.Random], None]] = {
    "type swapped": swap_type,
    "number huge or negative": huge_or_negative,
    "deep nesting": deep_nesting,
    "unknown key": unknown_key,
    "key removed": removed_key,
    "wrong dtype, tag or device string": wrong_dtype_string,
    "crafted value (tagged object, reference, nesting)": crafted_value,
    "crafted optimizer state": crafted_optimizer,
    "crafted random state": crafted_random_state,
}


def craft(run: Path, mutation: str, rng: random.Random, times: int = 1) -> None:
    """Apply `mutation` `times` times to the crafted step's manifest and seal it."""
    path = manifest_path(run)
    original = json.loads(path.read_bytes())
    for count in (times, 1):
        body = json.loads(json.dumps(original))
        for _ in range(count):
            MUTATIONS[mutation](body, rng)
        try:
            path.write_bytes(seal(body))
            return
        except (ValueError, RecursionError):  # nesting json cannot write: mutate once only
            continue


# -- what every read makes of it ------------------------------------------------------------------


def read_everything(run: Path) -> dict[str, str]:
    """The outcome of each read of `run`: "ok", "fell back", "refused" (a CheckpointError),
    or "BUG: ..." for any other exception."""
    outcomes: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for which in ("latest", CRAFTED_STEP):
            outcomes[f"restore({which!r})"] = _outcome(lambda w=which: _restore(run, w))
        for argv in (
            ["ls"],
            ["verify"],
            ["show", "--step", "2"],
            ["show", "--step", "2", "--json"],
        ):
            args = build_parser().parse_args([argv[0], str(run), *argv[1:]])
            out = Output(io.StringIO(), io.StringIO(), terminal=False)
            outcomes[" ".join(argv)] = _outcome(lambda a=args, o=out: _cli(a, o))
    return outcomes


def _cli(args: Any, out: Output) -> str:
    """A command run as `main` runs it, but without its mapping of exceptions to one line."""
    code = args.handler(args, out)
    return "ok" if code == 0 else f"exit {code}"


def _restore(run: Path, which: str | int) -> str:
    """Restore into a model and an Adam that has stepped; a refusal must leave both as
    they were ("BUG: half-applied" if not)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"model": model, "optimizer": optimizer}
    before = snapshot(state)
    try:
        info = Checkpointer(run, read_only=True).restore(state, which, strict=False)
    except CheckpointError:
        if snapshot(state) != before:
            raise AssertionError("half-applied restore: refused after loading") from None
        raise
    assert info is not None
    return "ok" if info.step == CRAFTED_STEP else "fell back"


def snapshot(state: dict[str, Any]) -> str:
    """The state dicts of `state`'s objects, as comparable text (tensors by value)."""
    return repr({name: _plain(obj.state_dict()) for name, obj in state.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.tolist())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _outcome(read: Callable[[], Any]) -> str:
    try:
        return read() or "ok"
    except CheckpointError as exc:
        return f"refused ({type(exc).__name__})"
    except Exception as exc:  # what the campaign looks for
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return f"BUG: {type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"[:300]


_DAMAGE = ("refused (CorruptCheckpointError)", "refused (DamagedManifestError)")


def disagreement(outcomes: dict[str, str]) -> str | None:
    """What is wrong when `verify` passes a step that `restore` refuses as damaged."""
    if outcomes[f"restore({CRAFTED_STEP!r})"] in _DAMAGE and outcomes["verify"] == "ok":
        return f"verify passed step {CRAFTED_STEP}, restore refused it as damaged"
    return None


@dataclass
class HostileReport:
    trials: dict[str, int] = field(default_factory=Counter)
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    bugs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bugs

    def summary(self) -> str:
        lines = [f"{m}: {self.trials[m]} manifests: {dict(c)}" for m, c in self.outcomes.items()]
        lines.append(
            f"hostile: {sum(self.trials.values())} crafted manifests, {len(self.bugs)} reads "
            "raised something other than a CheckpointError"
        )
        return "\n".join(lines)

    def details(self) -> list[str]:
        return self.bugs[:20]


def hostile_trials(trials: int, *, seed: int = 0, workdir: Path) -> HostileReport:
    """`trials` crafted manifests per mutation class, each read every way."""
    rng = random.Random(seed)
    pristine, run = workdir / "pristine", workdir / "crafted"
    make_run(pristine)
    report = HostileReport()
    for mutation in MUTATIONS:
        counts = report.outcomes.setdefault(mutation, Counter())
        for _ in range(trials):
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(pristine, run)
            craft(run, mutation, rng, times=rng.randint(1, 3))
            report.trials[mutation] += 1
            outcomes = read_everything(run)
            counts["restore " + outcomes["restore('latest')"]] += 1
            for read, outcome in outcomes.items():
                if outcome.startswith("BUG"):
                    counts["other exception"] += 1
                    report.bugs.append(f"{mutation}: {read}: {outcome}")
                elif read != "restore('latest')" and outcome.startswith(("refused", "exit")):
                    counts[
                        f"{read} {'refused' if outcome.startswith('refused') else 'flagged'}"
                    ] += 1
            problem = disagreement(outcomes)
            if problem is not None:
                counts["verify passed what restore refuses"] += 1
                report.bugs.append(f"{mutation}: {problem}")
    return report
