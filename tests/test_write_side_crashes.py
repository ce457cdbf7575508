"""A process killed at any file-system change of a write-side operation loses nothing it kept.

Each operation (`haltpoint gc`, `haltpoint import`, a save whose retention evicts old steps,
and a writer's clean-up at open) runs in a child process whose storage dies (`os._exit`) just
before its N-th change (a publish, rename, removal or file write), for every N up to the
number of changes the operation makes. After each death, read directly from disk: every step
the operation keeps is intact with its own weights, no byte haltpoint did not write is gone,
a new writer opens the run, `restore` and `restore("best")` load intact checkpoints (or raise a
`CheckpointError`), and running the operation again ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.errors import CheckpointError
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage

SRC = str(Path(__file__).resolve().parent.parent / "src")
LOSSES = {1: 0.5, 2: 0.1, 3: 0.7, 4: 0.9, 5: 0.8}  # step 2 is the best

#: Run in the child: patch LocalStorage so that its N-th change exits the process, then act.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from haltpoint.store import storage
    limit, action, run, extra = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    count = [0]
    def dying(name):
        real = getattr(storage.LocalStorage, name)
        def wrapper(self, *args, **kwargs):
            count[0] += 1
            if count[0] == limit:
                os._exit(137)
            return real(self, *args, **kwargs)
        return wrapper
    for name in ("publish", "rename", "remove", "remove_many", "rmtree", "open_write"):
        setattr(storage.LocalStorage, name, dying(name))
    code = 0
    if action == "gc":
        from haltpoint.cli import main
        code = main(["gc", run, "--keep-last", "1", "--keep-best", "1"])
    elif action == "import":
        from haltpoint.cli import main
        code = main(["import", extra, "-o", run, "--step", "9"])
    elif action == "save":
        from haltpoint import Checkpointer
        torch.manual_seed(6)
        model = torch.nn.Linear(3, 2)
        with Checkpointer(run, monitor="loss", keep_last=1, keep_best=1, async_save=False) as c:
            c.save(6, {"model": model}, {"loss": 0.3})
    elif action == "open":
        from haltpoint import Checkpointer
        Checkpointer(run, monitor="loss", keep_last=1, keep_best=1).close()
    print(json.dumps({"changes": count[0], "code": code}))
    """
)


def weights(step: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(step)
    return torch.nn.Linear(3, 2).state_dict()


def make_run(run: Path, action: str = "") -> None:
    """Five committed steps, none evicted (retention keeps them all); for `open`, also the
    debris of a save killed partway (what a writer's clean-up at open removes)."""
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, monitor="loss", keep_last=10, async_save=False) as ckpt:
        for step, loss in LOSSES.items():
            model.load_state_dict(weights(step))
            ckpt.save(step, {"model": model}, {"loss": loss})
    (run / "notes.txt").write_text("mine")  # a file haltpoint did not write
    if action == "open":  # the save commits step 6 and dies while it evicts 1, 3, 4 and 5
        assert child(DEBRIS, "save", run, run) is None


def child(limit: int, action: str, run: Path, extra: Path) -> dict[str, int] | None:
    """Run the child; its report, or None when it died at change `limit`."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(limit), action, str(run), str(extra)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=False,
    )
    if done.returncode == 137:
        return None
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    report: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def intact(run: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every committed step whose checkpoint verifies, with its weights (read directly)."""
    out = {}
    for entry in RunDirectory(LocalStorage(run, create=False)).committed():
        model = torch.nn.Linear(3, 2)
        with Checkpointer(run, read_only=True) as reader:
            try:
                reader.restore({"model": model}, entry.step)
            except CheckpointError:
                continue
        out[entry.step] = model.state_dict()
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def expected_weights(step: int) -> dict[str, torch.Tensor]:
    if step == 9:  # imported
        torch.manual_seed(9)
        return torch.nn.Linear(3, 2).state_dict()
    if step == 6:  # the child's save
        torch.manual_seed(6)
        return torch.nn.Linear(3, 2).state_dict()
    return weights(step)


#: What each operation must keep, whatever happens: gc keeps the newest and the best; import
#: writes beside the others; a save keeps the best (the new step is there or not); open, after
#: a save that died while evicting steps, keeps that save and the best.
KEPT = {"gc": {2, 5}, "import": set(LOSSES), "save": {2}, "open": {2, 6}}
#: Deaths tried per operation, spread evenly over its changes (the first and the last included).
SAMPLES = 4
#: For `open`: the change at which a save into the run dies first, leaving its debris behind.
DEBRIS = 8


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:taking over the writer lock")
@pytest.mark.parametrize("action", ["gc", "import", "save", "open"])
def test_a_kill_at_any_change_loses_no_kept_checkpoint(tmp_path: Path, action: str) -> None:
    source = tmp_path / "model.pt"
    torch.manual_seed(9)
    torch.save(torch.nn.Linear(3, 2).state_dict(), source)
    reference = tmp_path / "reference"
    make_run(reference, action)
    whole = child(0, action, reference, source)
    assert whole is not None and whole["code"] == 0
    final = intact(reference)
    changes = whole["changes"]
    assert changes > 0
    for limit in sorted({1 + (changes - 1) * k // (SAMPLES - 1) for k in range(SAMPLES)}):
        run = tmp_path / f"run{limit}"
        make_run(run, action)
        assert child(limit, action, run, source) is None, f"change {limit} of {changes}"
        left = intact(run)
        for step in KEPT[action]:
            assert step in left and same(left[step], expected_weights(step)), (limit, step)
        for step, state in left.items():  # nothing half-there loads wrong weights
            assert same(state, expected_weights(step)), (limit, step)
        assert (run / "notes.txt").read_text() == "mine"
        model = torch.nn.Linear(3, 2)
        with Checkpointer(run, monitor="loss", keep_last=10) as ckpt:
            info = ckpt.restore({"model": model}, "best")
            assert info is not None
            best = min((s for s in left if s in LOSSES or s == 6), key=lambda s: LOSSES.get(s, 0.3))
            assert info.step == best and same(model.state_dict(), expected_weights(best))
        if action == "save":
            continue  # the step was saved or not; a rerun of the loop saves the next one
        again = child(0, action, run, source)
        assert again is not None
        if action == "import" and 9 in left:  # it had landed: a second import is refused
            assert again["code"] != 0
        else:
            assert again["code"] == 0, limit
        assert set(intact(run)) == set(final), limit
