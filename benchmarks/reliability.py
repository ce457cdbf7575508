"""Reliability campaigns: kill -9 during saves, random damage, hostile input, full disks.

    python benchmarks/reliability.py kill --trials 200         (reliability_kill.py)
    python benchmarks/reliability.py damage --trials 5000      (reliability_damage.py)
    python benchmarks/reliability.py hostile --trials 200      (hostile.py)
    python benchmarks/reliability.py history --trials 2000     (reliability_history.py)
    python benchmarks/reliability.py quarantine --trials 1000  (reliability_quarantine.py)
    python benchmarks/reliability.py rot --trials 300          (reliability_rot.py)
    python benchmarks/reliability.py links --trials 500        (reliability_links.py)
    python benchmarks/reliability.py fulldisk --trials 700     (reliability_fulldisk.py)
    python benchmarks/reliability.py readers --trials 400      (reliability_readers.py)

Each campaign's module says what it does and what must hold; `reliability_common.py` holds what
they share, and `report` prints each one's summary line with the time it took. The exit status
is 1 when a campaign found anything lost or wrong. tests/test_reliability.py runs a few trials
of each through the names this module imports.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the campaigns beside this script

from hostile import hostile_trials
from reliability_common import report
from reliability_damage import damage_trials
from reliability_fulldisk import full_disk_trials
from reliability_history import history_trials
from reliability_kill import kill_trials
from reliability_links import link_trials
from reliability_quarantine import quarantine_trials
from reliability_readers import readers_trials
from reliability_rot import rot_trials

__all__ = [
    "damage_trials",
    "full_disk_trials",
    "history_trials",
    "hostile_trials",
    "kill_trials",
    "link_trials",
    "quarantine_trials",
    "readers_trials",
    "rot_trials",
]

CAMPAIGNS: dict[str, tuple[Callable[..., Any], int]] = {
    "kill": (kill_trials, 200),
    "damage": (damage_trials, 5000),
    "history": (history_trials, 2000),
    "quarantine": (quarantine_trials, 1000),
    "rot": (rot_trials, 300),
    "links": (link_trials, 500),
    "fulldisk": (full_disk_trials, 700),
    "readers": (readers_trials, 400),
    "hostile": (hostile_trials, 200),
}
"""Each campaign's trials function and its default number of trials."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=tuple(CAMPAIGNS))
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to put the runs (default: a temp dir)")
    args = parser.parse_args()
    trials, default = CAMPAIGNS[args.kind]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        start = time.perf_counter()
        result = trials(args.trials or default, seed=args.seed, workdir=Path(tmp))
        sys.exit(report(result, time.perf_counter() - start))


if __name__ == "__main__":
    main()
