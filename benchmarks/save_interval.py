"""Save intervals under failures: lost work plus save overhead, `every="auto"` against the rest.

Run: python benchmarks/save_interval.py [--hours 500] [--mtbf-hours 6] [--step-seconds 10]
        [--blocked 2.0] [--write 20.0] [--noise 0.3] [--seeds 5]

Simulates a run of `--hours` of useful training, `--step-seconds` a step, with failures drawn
from an exponential distribution of mean `--mtbf-hours` (a failure loses everything since the
last *committed* checkpoint; a save blocks the loop `--blocked` seconds and commits `--write`
seconds later, in the background; a save due while the previous write runs waits for it). The
save costs default to a few-GiB state on a local disk (see `checkpoint_speed.py`). Each policy
is haltpoint's own `SaveSchedule` on a simulated clock; `"auto"` sees the costs as measured,
each save's blocked and write time off by a log-normal factor (`--noise`, its sigma). The
optimum is Young/Daly with the true costs, sqrt(2 x blocked x MTBF), as a fixed wall-time
interval. Every policy meets the same failures (the same seeds); the figure is the waste
(wall time minus useful work) as a share of useful work, mean and spread over the seeds.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections.abc import Callable

from haltpoint.policies.interval import Auto, EverySteps, EveryTime, IntervalPolicy, young_daly
from haltpoint.schedule import SaveSchedule


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(policy: IntervalPolicy, args: argparse.Namespace, seed: int, mtbf: float) -> float:
    """The wall time to finish `args.hours` of useful steps under `policy`, in seconds."""
    rng = random.Random(seed)  # failures: the same for every policy of a seed
    noise = random.Random(seed + 10**6)  # what the measurements are off by
    total_steps = math.ceil(args.hours * 3600 / args.step_seconds)
    clock = Clock()
    committed = 0  # the step training resumes after
    while True:  # one process life per iteration, from `committed` to a failure or the end
        failure = clock.now + rng.expovariate(1 / mtbf)
        schedule = SaveSchedule(policy, monitor=None, mode="min", clock=clock)
        pending: tuple[int, float] | None = None  # (step, commit time) of the write in flight
        step = committed
        while step < total_steps:
            clock.now += args.step_seconds
            step += 1
            if pending is not None and pending[1] <= clock.now:
                committed, pending = pending[0], None
            if clock.now >= failure:
                break
            if schedule.decide(step, {}, None) is None:
                continue
            wait = 0.0 if pending is None else pending[1] - clock.now  # back-pressure
            if pending is not None:
                committed = pending[0]
            blocked = wait + args.blocked
            clock.now += blocked
            if clock.now >= failure:
                break
            pending = (step, clock.now + args.write)
            measured = blocked * _jitter(noise, args.noise)
            schedule.saved(step, measured, args.write * _jitter(noise, args.noise))
        else:
            return clock.now
        clock.now = failure


def _jitter(rng: random.Random, sigma: float) -> float:
    return math.exp(rng.gauss(0.0, sigma)) if sigma > 0 else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=500.0, help="useful training, hours")
    parser.add_argument("--mtbf-hours", type=float, default=6.0)
    parser.add_argument("--step-seconds", type=float, default=10.0)
    parser.add_argument("--blocked", type=float, default=2.0, help="seconds a save blocks")
    parser.add_argument("--write", type=float, default=20.0, help="seconds to commit a save")
    parser.add_argument("--noise", type=float, default=0.3, help="log-normal sigma of measurements")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    mtbf = args.mtbf_hours * 3600
    optimum = young_daly(args.blocked, mtbf)
    policies: dict[str, Callable[[], IntervalPolicy]] = {
        "Young/Daly, true costs": lambda: EveryTime(optimum),
        'every="auto"': lambda: Auto(overhead=0.02, mtbf_seconds=mtbf),
        "every=10 steps": lambda: EverySteps(10),
        "every=100 steps": lambda: EverySteps(100),
        "every=1000 steps": lambda: EverySteps(1000),
        'every="10min"': lambda: EveryTime(600.0),
        'every="1h"': lambda: EveryTime(3600.0),
    }
    useful = args.hours * 3600
    print(
        f"{args.hours:g} h of steps of {args.step_seconds:g} s, MTBF {args.mtbf_hours:g} h, save "
        f"blocks {args.blocked:g} s and commits after {args.write:g} s; optimum interval "
        f"{optimum:.0f} s; {args.seeds} seeds"
    )
    print(f"{'policy':<24}{'waste % of useful':>20}{'spread (min..max)':>22}{'x optimum':>11}")
    base = None
    for name, make in policies.items():
        wastes = [
            100 * (simulate(make(), args, seed, mtbf) - useful) / useful
            for seed in range(args.seeds)
        ]
        mean = statistics.fmean(wastes)
        base = mean if base is None else base
        spread = f"{min(wastes):.2f}..{max(wastes):.2f}"
        print(f"{name:<24}{mean:>19.2f}%{spread:>22}{mean / base:>11.3f}")


if __name__ == "__main__":
    main()
