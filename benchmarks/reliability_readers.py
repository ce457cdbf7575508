"""Reliability campaign `readers`.

A writer process saves as fast as it can with keep_last=1 (sync, then async) while this process
runs `verify`, `ls` and `export --which latest|best` on the run in turn: none may call a
checkpoint damaged (one removed under it is "removed"), and every export must succeed.
The seed fixes the readers' choices; how they interleave with the writer is the scheduler's,
so the counts (not the verdict) differ from one run to the next with the same seed.

    python benchmarks/reliability.py readers --trials 400
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from haltpoint.cli.listing import list_checkpoints
from haltpoint.cli.verify import verify_run
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage
from reliability_common import Report, quiet_cli

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
class ReadersReport(Report):
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

    def summary(self) -> str:
        return (
            f"readers: {self.rounds} rounds against a writer (keep_last=1); verify "
            f"{self.verify_runs} runs, {self.checked} checkpoints intact, {self.removed} removed "
            f"mid-check; ls {self.ls_runs} runs, {self.ls_removed} removed mid-read; export "
            f"{self.exports} runs, chose again {self.export_chose_again} times, failed "
            f"{len(self.export_failed)}; false damage reports {len(self.false_damage)}"
        )


def _export_latest(run: Path, out: Path, which: str) -> tuple[int, str]:
    return quiet_cli(["export", str(run), "--which", which, "--key", "model", "-o", str(out)])


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
