"""Reliability trials: kill -9 during saves, and random damage to committed runs.

    python benchmarks/reliability.py kill --trials 200
    python benchmarks/reliability.py damage --trials 5000
    python benchmarks/reliability.py hostile --trials 200   (benchmarks/hostile.py)
    python benchmarks/reliability.py history --trials 2000
    python benchmarks/reliability.py quarantine --trials 1000
    python benchmarks/reliability.py rot --trials 300
    python benchmarks/reliability.py links --trials 500
    python benchmarks/reliability.py fulldisk --trials 700
    python benchmarks/reliability.py readers --trials 400

`kill`: a child process trains a small model and saves every step (async saves, keep_last=2),
and is SIGKILLed at a random moment; then it is started again and resumes. After every kill the
run must open, `restore` must give the newest committed checkpoint with exactly that step's
weights, and every step the child reported committed (after `wait()`) must still be there
unless retention removed it. At the end the run is finished and its final weights must equal
those of a run that was never killed, bit for bit.

`damage`: a run of a few checkpoints is damaged at random (bits flipped or a file truncated,
in a manifest or a tensor file); then `haltpoint verify` must report the damage, and `restore`
must return exactly the data of the checkpoint it reports, or raise a `CheckpointError`. It
must never return wrong data.

`history`: one random bit of a run's `history.jsonl` is flipped, then `haltpoint gc --keep-last 1
--keep-best 1` runs: the true best checkpoint (by the monitor the run was saved with) must
still be there, and gc must not fail. The same flips on a copy in the older format (manifests
that do not record their monitor, history lines without checksums) show what the history
used to decide.

`quarantine`: the README loop's run (steps 10, 14, 15; keep_last=2, keep_best=2) gets one
file of one checkpoint damaged (its manifest or its tensor file); then a writer resumes it:
`restore` must give the newest intact checkpoint, exactly; every save up to step 17 must
work (a damaged step is saved again); no checkpoint the rules keep among the intact ones may
be lost, no byte of the damaged one deleted or changed, and neither `restore("best")`,
`restore("latest")` nor `haltpoint gc --keep-last 1` may pick or keep a damaged one over an
intact one.

`rot`: bits of a deduplicated tensor file (a frozen backbone) are flipped, or the file is
truncated, between two writer sessions; the second session saves four more checkpoints. Every
one of them must restore exactly (none may reference the rotten bytes), the writer must warn
once, and the damaged file must keep its bytes (older checkpoints reference it).

`links`: a symbolic link to a manifest, a tensor file or a checkpoint folder of the run is
planted, before the writer opens or while it is open, at the name of a file the writer then
writes (the lock, the history, the next checkpoint's folder, manifest or tensor file, a pin
marker); the writer opens, saves and pins. Every write through the link must be refused (or go
around it), no file of the run may change, and every checkpoint must still verify intact.

`fulldisk`: a run of six saves (keep_last=2, keep_best=1, step 2 saved pinned) hits ENOSPC
once, at one write point (the run folder or the lock when a writer opens; a checkpoint's
folder, tensor file, pin marker, manifest or history line during a save), sync or async; each
call that fails is made again, as the errors say. No bare `OSError` may escape, the retry
must work (never `CheckpointExistsError`), and at the end the history must hold one line per
step, step 2 must be pinned, the rules' checkpoints kept, and the newest restore exactly.

`readers`: a writer process saves as fast as it can with keep_last=1 (sync, then async) while
this process runs `verify`, `ls` and `export --which latest|best` on the run in turn: none may
call a checkpoint damaged (one removed under it is "removed"), and every export must succeed.

Each prints a summary line; the tests in tests/test_reliability.py run a few of each.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

from haltpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointExistsError,
    HistoryNotWrittenError,
    InsufficientSpaceError,
    LinkedFileError,
)
from haltpoint.cli import main as cli_main
from haltpoint.cli.listing import list_checkpoints
from haltpoint.cli.verify import verify_run
from haltpoint.policies.retention import build_rules, retained_steps
from haltpoint.reader import RunReader
from haltpoint.store import history as history_module
from haltpoint.store import lock as lock_module
from haltpoint.store.direct_io import AlignedFileWriter
from haltpoint.store.history import read_history
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage

TENSORS = "tensors.safetensors"

TRAINER = textwrap.dedent(
    """
    import sys, torch
    from haltpoint import Checkpointer

    run_dir, total, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 256), torch.nn.Dropout(0.2), torch.nn.Linear(256, 8)]
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model, "optimizer": optimizer, "step": -1}
    with Checkpointer(run_dir, keep_last=2) as ckpt:
        info = ckpt.restore(state)
        for step in range(info.step + 1 if info else 0, total):
            loss = model(torch.randn(32, 64)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state["step"] = step
            ckpt.save(step, state)
            ckpt.wait()
            print(step, flush=True)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    """
)


@dataclass
class KillReport:
    kills: int = 0
    restores_checked: int = 0
    committed_lost: list[int] = field(default_factory=list)
    wrong_restores: list[str] = field(default_factory=list)
    final_equal: bool = False

    @property
    def ok(self) -> bool:
        return not self.committed_lost and not self.wrong_restores and self.final_equal


def _train(run: Path, total: int, out: Path, kill_after: float | None) -> list[int]:
    child = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(run), str(total), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if kill_after is None:
        output, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the trainer failed with status {child.returncode}")
        return [int(line) for line in output.split()]
    first = child.stdout.readline()  # saving has started
    time.sleep(kill_after)
    os.kill(child.pid, signal.SIGKILL)
    output, _ = child.communicate()
    return [int(line) for line in (first + output).split()]


def _check_run(run: Path, known: int, report: KillReport) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stale lock of the killed child is taken over
        with Checkpointer(run, keep_last=2) as ckpt:
            steps = [info.step for info in ckpt.list()]
            if known >= 0 and known not in steps:
                report.committed_lost.append(known)
            model = torch.nn.Sequential(
                torch.nn.Linear(64, 256), torch.nn.Dropout(0.2), torch.nn.Linear(256, 8)
            )
            state = {"model": model, "step": -2}
            info = ckpt.restore(
                state,
                strict=False,
            )
    report.restores_checked += 1
    if steps and (info is None or info.step != max(steps) or state["step"] != info.step):
        report.wrong_restores.append(f"restored {info and info.step}, newest {max(steps)}")


def kill_trials(trials: int, *, total: int = 10_000, seed: int = 0, workdir: Path) -> KillReport:
    """Kill a training child `trials` times, check after each kill, then finish and compare."""
    rng = random.Random(seed)
    report = KillReport()
    run, reference = workdir / "killed", workdir / "reference"
    steps_per_trial = 0
    known = -1
    for _ in range(trials):
        reported = _train(run, total, workdir / "unused.pt", kill_after=rng.uniform(0.0, 0.25))
        report.kills += 1
        if reported:
            known = max(known, *reported)
            steps_per_trial = max(steps_per_trial, len(reported))
        _check_run(run, known, report)
    total_steps = known + 5  # finish a little past the last step the kills reached
    _train(run, total_steps, workdir / "killed.pt", kill_after=None)
    _train(reference, total_steps, workdir / "reference.pt", kill_after=None)
    killed = torch.load(workdir / "killed.pt", weights_only=True)
    straight = torch.load(workdir / "reference.pt", weights_only=True)
    report.final_equal = all(torch.equal(killed[k], straight[k]) for k in straight)
    return report


@dataclass
class DamageReport:
    trials: int = 0
    verify_missed: list[str] = field(default_factory=list)
    restore_refused: int = 0
    fell_back: int = 0
    restored_newest: int = 0
    wrong_data: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.verify_missed and not self.wrong_data


def _make_run(run: Path, steps: int, size: int) -> None:
    with Checkpointer(run, keep_last=steps, capture_rng=False, async_save=False) as ckpt:
        for step in range(steps):
            ckpt.save(step, {"w": torch.full((size,), float(step)), "step": step})


def _damage(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5 and data:
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated {path.name} to {cut} bytes"
    flips = rng.randint(1, 4)
    for _ in range(flips):
        index = rng.randrange(len(data))
        data[index] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flipped {flips} bits of {path.name}"


def damage_trials(trials: int, *, seed: int = 0, workdir: Path) -> DamageReport:
    """Damage a pristine run `trials` times; `restore` must be right or raise."""
    rng = random.Random(seed)
    pristine, run = workdir / "pristine", workdir / "damaged"
    _make_run(pristine, steps=3, size=1024)
    report = DamageReport()
    for _ in range(trials):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(pristine, run)
        files = sorted(p for p in run.glob("step-*/*") if p.is_file())
        what = _damage(rng.choice(files), rng)
        report.trials += 1
        checks = verify_run(RunDirectory(LocalStorage(run)))
        if all(check.status == "intact" for check in checks):
            report.verify_missed.append(what)
        state = {"w": torch.zeros(1024), "step": -1}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damage is reported by warnings; counted below
            try:
                info = Checkpointer(run, read_only=True, capture_rng=False).restore(state)
            except CheckpointError:
                report.restore_refused += 1
                continue
        if info is None:
            report.restore_refused += 1
            continue
        expected = torch.full((1024,), float(info.step))
        if state["step"] != info.step or not torch.equal(state["w"], expected):
            report.wrong_data.append(what)
        elif info.step == 2:
            report.restored_newest += 1
        else:
            report.fell_back += 1
    return report


@dataclass
class HistoryReport:
    trials: int = 0
    best_lost: list[str] = field(default_factory=list)
    gc_failed: list[str] = field(default_factory=list)
    undetected: list[str] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    legacy_best_lost: int = 0
    legacy_gc_failed: int = 0

    @property
    def ok(self) -> bool:
        return not self.best_lost and not self.gc_failed and not self.undetected


_CURVE = (0.9, 0.6, 0.4, 0.25, 0.3, 0.35, 0.5, 0.45)  # val_loss; the true best is step 3


def _make_ranked_run(run: Path) -> int:
    """A run saved with monitor val_loss (min), val_acc beside it; returns the best step."""
    from haltpoint import EarlyStopping

    model, stopper = torch.nn.Linear(4, 2), EarlyStopping("val_loss", mode="min", patience=20)
    with Checkpointer(
        run,
        monitor="val_loss",
        mode="min",
        keep_last=len(_CURVE),
        capture_rng=False,
        async_save=False,
    ) as ckpt:
        for step, loss in enumerate(_CURVE):
            metrics = {"val_loss": loss, "val_acc": round(1 - loss, 6)}
            stopper.step(metrics)
            ckpt.save(step, {"model": model, "stopper": stopper}, metrics)
    return _CURVE.index(min(_CURVE))


def _to_old_format(run: Path) -> None:
    """What an older haltpoint wrote: no ranking in manifests, no checksums in history."""
    import json

    from haltpoint.store.manifest import RANKING_KEY, Manifest

    for path in run.glob("step-*/manifest.json"):
        manifest = Manifest.decode(path.read_bytes(), source=str(path))
        del manifest.extra[RANKING_KEY]
        path.write_bytes(manifest.encode())
    history = run / "history.jsonl"
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    history.write_text(
        "".join(
            json.dumps({k: v for k, v in x.items() if k != "checksum"}, separators=(",", ":"))
            + "\n"
            for x in lines
        )
    )


def _gc_after_a_flip(pristine: Path, run: Path, rng: random.Random) -> tuple[str, int, str]:
    """Flip one bit of the history of a copy of `pristine`, then run gc.

    Returns what was flipped, gc's exit status, and what reading the history made of the
    flip: "warned" (a line skipped with a warning), "dropped" (the last line, taken for one
    torn by a crash), "unchanged" (every record reads back as it was), or "undetected" (a
    record read back changed, with no warning).
    """
    import contextlib
    import io

    from haltpoint.cli import main as cli
    from haltpoint.store.history import read_history

    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(pristine, run)
    storage = LocalStorage(run)
    before = read_history(storage)
    history = run / "history.jsonl"
    data = bytearray(history.read_bytes())
    index, bit = rng.randrange(len(data)), rng.randrange(8)
    data[index] ^= 1 << bit
    history.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = read_history(storage)
    kept = [r for r in after if any(all(r.get(k) == v for k, v in b.items()) for b in before)]
    if caught:
        seen = "warned"
    elif len(kept) < len(after):
        seen = "undetected"
    else:
        seen = "dropped" if len(after) < len(before) else "unchanged"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli(["gc", str(run), "--keep-last", "1", "--keep-best", "1"])
    return f"bit {bit} of byte {index}", code, seen


def history_trials(trials: int, *, seed: int = 0, workdir: Path) -> HistoryReport:
    """Flip one bit of the history `trials` times, then gc: the true best must stay."""
    rng = random.Random(seed)
    pristine, old, run = workdir / "pristine", workdir / "old-format", workdir / "flipped"
    best = _make_ranked_run(pristine)
    shutil.copytree(pristine, old)
    _to_old_format(old)
    report = HistoryReport()
    for _ in range(trials):
        report.trials += 1
        what, code, seen = _gc_after_a_flip(pristine, run, rng)
        report.seen[seen] = report.seen.get(seen, 0) + 1
        if seen == "undetected":
            report.undetected.append(what)
        if code != 0:
            report.gc_failed.append(what)
        elif best not in [e.step for e in RunDirectory(LocalStorage(run)).committed()]:
            report.best_lost.append(what)
        _, code, _ = _gc_after_a_flip(old, run, rng)
        if code != 0:
            report.legacy_gc_failed += 1
        elif best not in [e.step for e in RunDirectory(LocalStorage(run)).committed()]:
            report.legacy_best_lost += 1
    return report


@dataclass
class QuarantineReport:
    trials: int = 0
    damaged: int = 0  # trials whose damage made a checkpoint unusable (the rest: header bytes)
    quarantined_by_restore: int = 0
    quarantined_by_retention: int = 0
    left_in_place: int = 0  # an older checkpoint's manifest damaged: neither used nor moved
    dropped_by_rules: int = 0  # damaged, and removed by retention, whose rules keep it not
    saves: int = 0
    stuck: list[str] = field(default_factory=list)  # a save that failed
    wrong_restores: list[str] = field(default_factory=list)
    intact_lost: list[str] = field(default_factory=list)
    damaged_bytes_lost: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.stuck or self.wrong_restores or self.intact_lost or self.damaged_bytes_lost
        )


_QUARANTINE_LOSSES = {10: 0.3, 14: 0.5, 15: 0.1}  # step 15, the newest, is also the best
_RULES = build_rules(keep_last=2, keep_best=2, monitor="loss", mode="min", keep_every=None)


def _quarantine_writer(run: Path, async_save: bool = True) -> Checkpointer:
    return Checkpointer(
        run, monitor="loss", keep_last=2, keep_best=2, capture_rng=False, async_save=async_save
    )


def _quarantine_state(step: int) -> dict:
    return {"w": torch.full((1024,), float(step)), "step": step}


def _usable(run: Path, step: int) -> bool:
    """Whether a checkpoint of the damaged run is usable: its manifest decodes, its data hashes."""
    entry = next(e for e in RunDirectory(LocalStorage(run)).scan() if e.step == step)
    if entry.manifest is None:
        return False
    return RunReader(RunDirectory(LocalStorage(run)), None, "min").damage(entry) is None


def _restored(ckpt: Checkpointer, which: str, usable: set[int], why: list[str]) -> int | None:
    state = {"w": torch.zeros(1024), "step": -1}
    info = ckpt.restore(state, which)
    if info is None or info.step not in usable:
        why.append(f"restore({which!r}) gave {info and info.step}, usable: {sorted(usable)}")
        return None
    if state["step"] != info.step or not torch.equal(state["w"], torch.full((1024,), info.step)):
        why.append(f"restore({which!r}) of step {info.step} gave other data")
    return info.step


def _quarantine_trial(run: Path, rng: random.Random, report: QuarantineReport) -> None:
    victim = rng.choice(sorted(_QUARANTINE_LOSSES))
    folder = run / f"step-{victim:09d}"
    what = f"step {victim}: " + _damage(folder / rng.choice(["manifest.json", TENSORS]), rng)
    evidence = {p.name: p.read_bytes() for p in folder.iterdir()}
    usable = {s for s in _QUARANTINE_LOSSES if s != victim or _usable(run, s)}
    unusable = victim not in usable
    report.damaged += unusable
    losses = dict(_QUARANTINE_LOSSES)
    with _quarantine_writer(run) as ckpt:
        resumed = _restored(ckpt, "latest", usable, report.wrong_restores)
        if resumed is None:
            return
        for step in range(resumed + 1, 18):  # the loop goes on; a damaged step is saved again
            try:
                ckpt.save(step, _quarantine_state(step), {"loss": 0.6})
                ckpt.wait()
            except CheckpointError as exc:
                report.stuck.append(f"{what}: save({step}): {exc}")
                return
            report.saves += 1
            usable.add(step)
            losses[step] = 0.6
        listed = {info.step for info in ckpt.list()}
        for which in ("latest", "best"):
            _restored(ckpt, which, listed & usable, report.wrong_restores)
    # the steps the rules keep among the usable checkpoints must all be there
    records = [SimpleNamespace(step=s, metrics={"loss": losses[s]}, pinned=False) for s in usable]
    expected = retained_steps(records, _RULES)
    if not expected <= listed:
        report.intact_lost.append(f"{what}: kept {sorted(listed)}, expected {sorted(expected)}")
    held = sorted(p.name for p in (run / "quarantine").glob("*.json"))
    kept_aside = unusable and (held or (folder / "manifest.json").exists())
    if unusable:
        if held == [f"step-{victim:09d}-1.json"]:
            report.quarantined_by_restore += victim > resumed
            report.quarantined_by_retention += victim < resumed
        elif kept_aside:
            report.left_in_place += 1
        else:
            report.dropped_by_rules += 1
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli_main(["gc", str(run), "--keep-last", "1"])
    newest = [e.step for e in RunDirectory(LocalStorage(run)).committed()]
    if newest != [17]:
        report.intact_lost.append(f"{what}: gc --keep-last 1 kept {newest}, not [17]")
    if kept_aside:  # no byte of a checkpoint set aside (or left in place) is gone or changed
        aside = [run / "quarantine" / name for name in held]
        for name, data in evidence.items():
            sources = [folder / name, *(aside if name == "manifest.json" else [])]
            if not any(p.exists() and p.read_bytes() == data for p in sources):
                report.damaged_bytes_lost.append(f"{what}: {name} is gone or changed")


def quarantine_trials(trials: int, *, seed: int = 0, workdir: Path) -> QuarantineReport:
    """Damage one file of the README loop's run `trials` times, then resume it as a writer."""
    rng = random.Random(seed)
    pristine, run = workdir / "pristine", workdir / "resumed"
    with _quarantine_writer(pristine, async_save=False) as ckpt:
        for step, loss in _QUARANTINE_LOSSES.items():
            ckpt.save(step, _quarantine_state(step), {"loss": loss})
    report = QuarantineReport()
    for _ in range(trials):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(pristine, run)
        report.trials += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damage and quarantine are reported by warnings
            _quarantine_trial(run, rng, report)
    return report


FROZEN = 1 << 18  # float32 elements of each frozen tensor: 1 MiB, large enough for dedup


def _frozen(step: int) -> dict[str, object]:
    """The state saved at `step`: two frozen tensors and a head that changes every step."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(FROZEN, generator=g), torch.randn(FROZEN, generator=g)
    return {"a": a, "b": b, "head": torch.full((64,), float(step)), "step": step}


@dataclass
class RotReport:
    trials: int = 0
    warned_once: int = 0
    referenced_rot: list[str] = field(default_factory=list)
    evidence_changed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.referenced_rot and not self.evidence_changed


def rot_trials(trials: int, *, seed: int = 0, workdir: Path) -> RotReport:
    """Rot a deduplicated file between two sessions; later saves must never reference it."""
    rng = random.Random(seed)
    pristine, run = workdir / "rot-pristine", workdir / "rot"
    options: dict[str, object] = {"keep_last": 10, "capture_rng": False}
    with Checkpointer(pristine, async_save=False, **options) as ckpt:  # type: ignore[arg-type]
        for step in range(3):
            ckpt.save(step, _frozen(step))
    report = RotReport()
    for _ in range(trials):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(pristine, run)
        record = RunDirectory(LocalStorage(run)).read_manifest("step-000000002").tensors
        key = rng.choice(["a", "b"])
        path = run / record[key].file
        data = bytearray(path.read_bytes())
        if rng.random() < 0.25:
            cut = rng.randrange(record[key].offset, record[key].offset + record[key].nbytes)
            what = f"truncated {record[key].file} to {cut} bytes (in {key!r})"
            data = data[:cut]
        else:
            flips = rng.randint(1, 4)
            for _ in range(flips):
                index = rng.randrange(record[key].offset, record[key].offset + record[key].nbytes)
                data[index] ^= 1 << rng.randrange(8)
            what = f"flipped {flips} bits of {key!r} in {record[key].file}"
        path.write_bytes(bytes(data))
        report.trials += 1
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            async_save = rng.random() < 0.5
            with Checkpointer(run, async_save=async_save, **options) as ckpt:  # type: ignore[arg-type]
                for step in range(3, 7):
                    ckpt.save(step, _frozen(step))
        report.warned_once += sum("do not match" in str(w.message) for w in seen) == 1
        for step in range(3, 7):
            state = {
                k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1
                for k, v in _frozen(step).items()
            }
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    Checkpointer(run, read_only=True, capture_rng=False).restore(state, step)
            except CheckpointError as exc:
                report.referenced_rot.append(f"{what}: step {step}: {exc}")
                continue
            expected = _frozen(step)
            if any(not torch.equal(state[k], expected[k]) for k in ("a", "b", "head")):
                report.referenced_rot.append(f"{what}: step {step} restored wrong data")
        if path.read_bytes() != bytes(data):
            report.evidence_changed.append(what)
    return report


@dataclass
class LinkReport:
    trials: int = 0
    refused: int = 0
    refused_other: int = 0
    went_around: int = 0
    changed: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.changed and not self.damaged


_LINK_NAMES = (
    ".haltpoint.lock",
    "history.jsonl",
    "step-000000003",
    "step-000000003/manifest.json",
    "step-000000003/tensors.safetensors",
    "step-000000001/pinned",
)


def _writer_session(run: Path, plant: Callable[[], None], before_open: bool, sync: bool) -> None:
    if before_open:
        plant()
    with Checkpointer(run, keep_last=10, capture_rng=False, async_save=not sync) as ckpt:
        if not before_open:
            plant()
        ckpt.save(3, _frozen(3))
        ckpt.wait()
        ckpt.pin(1)


def link_trials(trials: int, *, seed: int = 0, workdir: Path) -> LinkReport:
    """Plant links where the writer writes; nothing may be written through them."""
    rng = random.Random(seed)
    pristine, run = workdir / "links-pristine", workdir / "links"
    with Checkpointer(pristine, keep_last=10, capture_rng=False, async_save=False) as ckpt:
        for step in range(3):
            ckpt.save(step, _frozen(step))
    report = LinkReport()
    for _ in range(trials):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(pristine, run)
        name = rng.choice(_LINK_NAMES)
        step = rng.randrange(3)
        if name == "step-000000003":
            target = f"step-{step:09d}"
        else:
            target = f"step-{step:09d}/" + rng.choice(["manifest.json", "tensors.safetensors"])
        before_open, sync = rng.random() < 0.5, rng.random() < 0.5
        what = f"{name} -> {target}, planted {'before' if before_open else 'after'} opening"
        files = sorted(run.glob("step-*/*"))
        snapshot = {p: p.read_bytes() for p in files}

        def plant(name: str = name, target: str = target) -> None:
            link = run / name
            link.parent.mkdir(exist_ok=True)
            if link.exists() and not link.is_dir():
                link.unlink()
            os.symlink(run / target, link)

        report.trials += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # planted links are reported by warnings too
            try:
                _writer_session(run, plant, before_open, sync)
                report.went_around += 1
            except LinkedFileError:
                report.refused += 1
            except CheckpointError:
                report.refused_other += 1
        report.changed += [
            f"{what}: {p.name} changed" for p, b in snapshot.items() if p.read_bytes() != b
        ]
        checks = verify_run(RunDirectory(LocalStorage(run)))
        report.damaged += [
            f"{what}: step {c.step} {c.status}"
            for c in checks
            if c.step < 3 and c.status != "intact"
        ]
    return report


_LOSSES = (0.5, 0.4, 0.45, 0.3, 0.35, 0.38)  # step 3 is the best; step 2 is saved pinned
_FULL_KEPT = [2, 3, 4, 5]  # pinned, best, and the last two
FULL_POINTS = (
    "open: run folder",
    "open: lock",
    "save: folder",
    "save: tensors",
    "save: pin",
    "save: manifest",
    "save: history",
)


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullOnce:
    """Patches one write point so that its first call, once armed, raises ENOSPC."""

    def __init__(self, point: str) -> None:
        self.point, self.armed, self.fired = point, False, False

    def _hit(self, matches: bool) -> None:
        if self.armed and not self.fired and matches:
            self.fired = True
            raise _no_space()

    def patches(self) -> list[contextlib.AbstractContextManager[object]]:
        point, hit = self.point, self._hit
        if point == "open: run folder":
            real_makedirs = os.makedirs

            def makedirs(path: str, *args: object, **kwargs: object) -> None:
                hit(not os.path.isdir(path))
                real_makedirs(path, *args, **kwargs)  # type: ignore[arg-type]

            return [mock.patch.object(os, "makedirs", makedirs)]
        if point == "open: lock":
            real_open = lock_module.open_unlinked

            def open_lock(path: str, *args: int) -> int:
                hit(True)
                return real_open(path, *args)

            return [mock.patch.object(lock_module, "open_unlinked", open_lock)]
        if point == "save: folder":
            real_dir = LocalStorage.makedirs

            def folder(self: LocalStorage, rel: str) -> None:
                hit(rel.startswith("step-"))
                real_dir(self, rel)

            return [mock.patch.object(LocalStorage, "makedirs", folder)]
        if point == "save: tensors":
            real_write = AlignedFileWriter._pwrite

            def pwrite(self: AlignedFileWriter, view: memoryview, offset: int) -> None:
                hit(True)
                real_write(self, view, offset)

            return [mock.patch.object(AlignedFileWriter, "_pwrite", pwrite)]
        if point in ("save: pin", "save: manifest"):
            real_publish = LocalStorage.publish
            name = "/pinned" if point == "save: pin" else "/manifest.json"

            def publish(self: LocalStorage, rel: str, data: bytes) -> None:
                hit(rel.endswith(name))
                real_publish(self, rel, data)

            return [mock.patch.object(LocalStorage, "publish", publish)]
        real_append = history_module._append_local

        def append(path: str, line: bytes) -> None:
            hit(True)
            real_append(path, line)

        return [mock.patch.object(history_module, "_append_local", append)]


@dataclass
class FullDiskReport:
    trials: int = 0
    raised: dict[str, int] = field(default_factory=dict)  # "point: error class" -> count
    bare_oserror: list[str] = field(default_factory=list)
    retry_refused: list[str] = field(default_factory=list)
    retry_failed: list[str] = field(default_factory=list)
    pins_lost: list[str] = field(default_factory=list)
    history_wrong: list[str] = field(default_factory=list)
    kept_wrong: list[str] = field(default_factory=list)
    wrong_restores: list[str] = field(default_factory=list)
    not_hit: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.not_hit
            or self.bare_oserror
            or self.retry_refused
            or self.retry_failed
            or self.pins_lost
            or self.history_wrong
            or self.kept_wrong
            or self.wrong_restores
        )


def _full_state(step: int) -> dict[str, object]:
    return {"w": torch.full((1 << 16,), float(step)), "step": step}


def _twice(what: str, call: Callable[[], object], report: FullDiskReport, point: str) -> None:
    """`call`, and when it fails on the full disk, the same call once more (space freed)."""
    for attempt in range(2):
        try:
            call()
            return
        except (HistoryNotWrittenError, InsufficientSpaceError) as exc:
            key = f"{point}: {type(exc).__name__}"
            report.raised[key] = report.raised.get(key, 0) + 1
            if attempt:
                report.retry_failed.append(f"{what}: {exc}")
        except CheckpointExistsError as exc:
            report.retry_refused.append(f"{what}: {exc}")
            return
        except OSError as exc:
            report.bare_oserror.append(f"{what}: {exc!r}")
            if attempt == 0:
                continue
            return


def _full_disk_trial(run: Path, point: str, at: int, sync: bool, report: FullDiskReport) -> None:
    """Six saves (a writer opened at step 0 and again at `at`); ENOSPC once at `point`
    during the open or the save of step `at`."""
    full = _FullOnce(point)
    options = {"monitor": "val_loss", "keep_best": 1, "keep_last": 2, "capture_rng": False}
    writers: list[Checkpointer] = []
    what = f"{point} at step {at} ({'sync' if sync else 'async'})"

    def open_writer() -> None:
        writers.append(Checkpointer(run, async_save=not sync, **options))  # type: ignore[arg-type]

    def save(step: int) -> None:
        writers[-1].save(step, _full_state(step), {"val_loss": _LOSSES[step]}, pin=step == 2)
        writers[-1].wait()

    def armed(on: bool, call: Callable[[], None]) -> Callable[[], None]:
        def run_it() -> None:
            full.armed = on
            try:
                call()
            finally:
                full.armed = False

        return run_it

    with contextlib.ExitStack() as stack:
        for patch in full.patches():
            stack.enter_context(patch)
        for step in range(len(_LOSSES)):
            if step in (0, at):
                if writers:
                    writers[-1].close()
                count = len(writers)
                on = point.startswith("open") and step == at
                _twice(f"{what}: open", armed(on, open_writer), report, point)
                if len(writers) == count:
                    return
            on = point.startswith("save") and step == at
            _twice(f"{what}: save({step})", armed(on, lambda step=step: save(step)), report, point)
        writers[-1].close()
    if not full.fired:
        report.not_hit.append(what)
    steps = [r["step"] for r in read_history(LocalStorage(run))]
    if steps != list(range(len(_LOSSES))):
        report.history_wrong.append(f"{what}: history steps {steps}")
    with Checkpointer(run, read_only=True, capture_rng=False) as reader:
        infos = reader.list()
        if [i.step for i in infos] != _FULL_KEPT:
            report.kept_wrong.append(f"{what}: kept {[i.step for i in infos]}")
        if not any(i.step == 2 and i.pinned for i in infos):
            report.pins_lost.append(what)
        state = {"w": torch.zeros(1 << 16), "step": -1}
        info = reader.restore(state)
        last = len(_LOSSES) - 1
        if info is None or info.step != last or not torch.equal(state["w"], _full_state(last)["w"]):
            report.wrong_restores.append(f"{what}: restored {info and info.step}")


def full_disk_trials(trials: int, *, seed: int = 0, workdir: Path) -> FullDiskReport:
    """ENOSPC at one write point of a run of six saves; each failed call is made again."""
    rng = random.Random(seed)
    report = FullDiskReport()
    for index in range(trials):
        point = FULL_POINTS[index % len(FULL_POINTS)]
        at = {"save: pin": 2, "open: run folder": 0}.get(point, rng.randrange(len(_LOSSES)))
        run = workdir / "full" / str(index)
        report.trials += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _full_disk_trial(run, point, at, rng.random() < 0.5, report)
        shutil.rmtree(run, ignore_errors=True)
    return report


READERS_WRITER = textwrap.dedent(
    """
    import os, sys, torch
    from haltpoint import Checkpointer

    run_dir, stop, sync = sys.argv[1], sys.argv[2], sys.argv[3] == "sync"
    with Checkpointer(run_dir, monitor="val_loss", keep_last=1, async_save=not sync,
                      capture_rng=False) as ckpt:
        step = 0
        while not os.path.exists(stop):
            model = {f"layer{i}": torch.full((1 << 18,), float(step + i)) for i in range(4)}
            ckpt.save(step, {"model": model, "step": step}, {"val_loss": 1.0 / (step + 1)})
            if step == 0:
                ckpt.wait()
                print("saving", flush=True)
            step += 1
    """
)


@dataclass
class ReadersReport:
    rounds: int = 0
    verify_runs: int = 0
    checked: int = 0
    removed: int = 0
    false_damage: list[str] = field(default_factory=list)
    ls_runs: int = 0
    ls_removed: int = 0
    exports: int = 0
    export_chose_again: int = 0
    export_failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.false_damage and not self.export_failed


def _export_latest(run: Path, out: Path, which: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli_main(["export", str(run), "--which", which, "--key", "model", "-o", str(out)])
    return code, " ".join(err.getvalue().split())


def readers_trials(rounds: int, *, seed: int = 0, workdir: Path) -> ReadersReport:
    """verify, ls and export of a run whose writer saves with keep_last=1 all the while."""
    rng = random.Random(seed)
    report = ReadersReport()
    run = workdir / "readers"
    for sync in ("sync", "async"):
        stop = workdir / f"stop-{sync}"
        writer = subprocess.Popen(
            [sys.executable, "-c", READERS_WRITER, str(run), str(stop), sync],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        writer.stdout.readline()  # the first checkpoint is committed
        try:
            for _ in range(rounds // 2):
                report.rounds += 1
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    checks = verify_run(RunDirectory(LocalStorage(run)))
                    rows, _ = list_checkpoints(RunDirectory(LocalStorage(run)))
                report.verify_runs += 1
                report.checked += sum(c.status == "intact" for c in checks)
                report.removed += sum(c.status == "removed" for c in checks)
                report.false_damage += [
                    f"verify: step {c.step}: {'; '.join(c.problems())}"
                    for c in checks
                    if c.status == "damaged"
                ]
                report.ls_runs += 1
                report.ls_removed += sum(r.status == "removed" for r in rows)
                report.false_damage += [
                    f"ls: step {r.step}: {r.error}" for r in rows if r.status == "damaged"
                ]
                which = rng.choice(["latest", "best"])
                code, err = _export_latest(run, workdir / "exported.safetensors", which)
                report.exports += 1
                report.export_chose_again += err.count("choosing the")
                if code != 0:
                    report.export_failed.append(f"export --which {which}: {err}")
        finally:
            stop.touch()
            writer.communicate(timeout=120)
        shutil.rmtree(run, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kinds = ("kill", "damage", "history", "quarantine", "rot", "links", "fulldisk", "readers")
    kinds += ("hostile",)
    parser.add_argument("kind", choices=kinds)
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to put the runs (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        if args.kind == "kill":
            kill = kill_trials(args.trials or 200, seed=args.seed, workdir=workdir)
            print(
                f"kill -9: {kill.kills} kills, {kill.restores_checked} restores checked, "
                f"committed steps lost: {len(kill.committed_lost)}, wrong restores: "
                f"{len(kill.wrong_restores)}, resumed run bitwise equal to an unkilled one: "
                f"{kill.final_equal} ({time.perf_counter() - start:.0f} s)"
            )
            sys.exit(0 if kill.ok else 1)
        if args.kind == "hostile":
            from hostile import hostile_trials  # benchmarks/hostile.py, beside this script

            crafted = hostile_trials(args.trials or 200, seed=args.seed, workdir=workdir)
            for mutation, counts in crafted.outcomes.items():
                print(f"{mutation}: {crafted.trials[mutation]} manifests: {dict(counts)}")
            print(
                f"hostile: {sum(crafted.trials.values())} crafted manifests, "
                f"{len(crafted.bugs)} reads raised something other than a CheckpointError "
                f"({time.perf_counter() - start:.0f} s)"
            )
            for bug in crafted.bugs[:20]:
                print(f"  {bug}")
            sys.exit(0 if crafted.ok else 1)
        if args.kind == "quarantine":
            q = quarantine_trials(args.trials or 1000, seed=args.seed, workdir=workdir)
            print(
                f"quarantine: {q.trials} trials, {q.damaged} made a checkpoint unusable; set aside "
                f"by restore {q.quarantined_by_restore}, by retention "
                f"{q.quarantined_by_retention}, left in place {q.left_in_place}, removed by "
                f"retention (not kept) {q.dropped_by_rules}; {q.saves} saves, "
                f"stuck: {len(q.stuck)}; wrong restores: {len(q.wrong_restores)}; intact "
                f"checkpoints lost: {len(q.intact_lost)}; damaged bytes lost: "
                f"{len(q.damaged_bytes_lost)} ({time.perf_counter() - start:.0f} s)"
            )
            sys.exit(0 if q.ok else 1)
        if args.kind == "history":
            flips = history_trials(args.trials or 2000, seed=args.seed, workdir=workdir)
            print(
                f"history: {flips.trials} single-bit flips of history.jsonl, then gc "
                f"--keep-last 1 --keep-best 1: true best lost {len(flips.best_lost)}, gc failed "
                f"{len(flips.gc_failed)}; reading the history skipped the line with a warning "
                f"{flips.seen.get('warned', 0)} times, dropped a last line as torn "
                f"{flips.seen.get('dropped', 0)} times, read every record unchanged "
                f"{flips.seen.get('unchanged', 0)} times, returned a changed record "
                f"{len(flips.undetected)} times; the same flips in the older format: true best "
                f"lost {flips.legacy_best_lost}, gc failed {flips.legacy_gc_failed} "
                f"({time.perf_counter() - start:.0f} s)"
            )
            sys.exit(0 if flips.ok else 1)
        if args.kind == "rot":
            rot = rot_trials(args.trials or 300, seed=args.seed, workdir=workdir)
            print(
                f"rot: {rot.trials} trials, {4 * rot.trials} later saves; restores that met the "
                f"rotten bytes: {len(rot.referenced_rot)}; warned exactly once: "
                f"{rot.warned_once}; damaged files changed: {len(rot.evidence_changed)} "
                f"({time.perf_counter() - start:.0f} s)"
            )
            sys.exit(0 if rot.ok else 1)
        if args.kind == "links":
            links = link_trials(args.trials or 500, seed=args.seed, workdir=workdir)
            print(
                f"links: {links.trials} trials; refused with LinkedFileError {links.refused}, "
                f"with another CheckpointError {links.refused_other}, went around the link "
                f"{links.went_around}; files changed through a link: {len(links.changed)}; "
                f"checkpoints damaged: {len(links.damaged)} ({time.perf_counter() - start:.0f} s)"
            )
            sys.exit(0 if links.ok else 1)
        if args.kind == "fulldisk":
            fd = full_disk_trials(args.trials or 700, seed=args.seed, workdir=workdir)
            raised = ", ".join(f"{k} {v}" for k, v in sorted(fd.raised.items()))
            print(
                f"fulldisk: {fd.trials} trials; raised: {raised}; bare OSError "
                f"{len(fd.bare_oserror)}, retry refused {len(fd.retry_refused)}, retry failed "
                f"{len(fd.retry_failed)}; history wrong {len(fd.history_wrong)}, pins lost "
                f"{len(fd.pins_lost)}, kept wrong {len(fd.kept_wrong)}, wrong restores "
                f"{len(fd.wrong_restores)}, injection not hit {len(fd.not_hit)} "
                f"({time.perf_counter() - start:.0f} s)"
            )
            sys.exit(0 if fd.ok else 1)
        if args.kind == "readers":
            rd = readers_trials(args.trials or 400, seed=args.seed, workdir=workdir)
            print(
                f"readers: {rd.rounds} rounds against a writer (keep_last=1); verify "
                f"{rd.verify_runs} runs, {rd.checked} checkpoints intact, {rd.removed} removed "
                f"mid-check; ls {rd.ls_runs} runs, {rd.ls_removed} removed mid-read; export "
                f"{rd.exports} runs, chose again {rd.export_chose_again} times, failed "
                f"{len(rd.export_failed)}; false damage reports {len(rd.false_damage)} "
                f"({time.perf_counter() - start:.0f} s)"
            )
            sys.exit(0 if rd.ok else 1)
        damage = damage_trials(args.trials or 5000, seed=args.seed, workdir=workdir)
        print(
            f"damage: {damage.trials} trials; missed by verify: {len(damage.verify_missed)}; "
            f"restore gave the newest checkpoint {damage.restored_newest} times, fell back to "
            f"an older intact one {damage.fell_back} times, refused {damage.restore_refused} "
            f"times; wrong data returned: {len(damage.wrong_data)} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        sys.exit(0 if damage.ok else 1)


if __name__ == "__main__":
    main()
