"""Training-loop throughput with checkpoints, side by side: torch.save, DCP's async_save,
haltpoint's asynchronous save and haltpoint's overlapped save (`overlap=True`).

Run: python benchmarks/training_loop.py [--mib 128] [--steps 40] [--rounds 3] [--dir PATH]

An MLP of `--mib` MiB of float32 weights trains with AdamW (so a save holds three times that:
weights and two moments). Each way runs `--steps` steps with a save every 10 steps and, in
a second pass, every step; the runs of all ways, and one without saving, take turns within
each of `--rounds` rounds, so that a slow spell of the machine hits every way alike. The
throughput loss of a run is its time over the no-saving run of the same round, less 1; the
table gives the median over the rounds and the spread (lowest to highest). "blocked" is the
median time a save holds the loop: the `save` call itself, plus, for the overlapped save,
the time `optimizer.step()` waited for the copy, against one in-memory copy of the state.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from haltpoint import Checkpointer

WIDTH = 1024
Save = Callable[[int], None]
Way = Callable[[Path, torch.nn.Module, torch.optim.Optimizer], Any]
"""A context manager yielding (save(step), the optimizer gate of an overlapped save or None)."""


def make(mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = max(1, (mib << 20) // (WIDTH * WIDTH * 4))
    model = torch.nn.Sequential(
        *(m for _ in range(layers) for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, optimizer


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def memcpy_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """One copy of the state into buffers that exist already: the floor of any snapshot."""
    live = list(model.state_dict().values())
    live += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    copies = [t.clone() for t in live]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for dst, src in zip(copies, live, strict=True):
            dst.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def torch_save(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Iterator[Any]:
    def save(step: int) -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
        torch.save(state, folder / f"{step % 2}.pt")

    yield save, None


@contextmanager
def dcp_async(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Iterator[Any]:
    pending: list[Any] = []

    def save(step: int) -> None:
        if pending:  # one save in flight at a time, as haltpoint's
            pending.pop().result()
        weights, optim = get_state_dict(model, opt)
        state = {"model": weights, "optimizer": optim}
        pending.append(dcp.async_save(state, checkpoint_id=str(folder / f"{step % 2}")))

    yield save, None
    if pending:
        pending.pop().result()


def haltpoint_way(overlap: bool) -> Way:
    @contextmanager
    def way(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Iterator[Any]:
        with Checkpointer(folder / "run", keep_last=2, overlap=overlap) as ckpt:

            def save(step: int) -> None:
                ckpt.save(step, {"model": model, "optimizer": opt, "step": step})

            yield save, ckpt._gate

    return way


WAYS: dict[str, Way] = {
    "torch.save": torch_save,
    "dcp.async_save": dcp_async,
    "haltpoint (async)": haltpoint_way(False),
    "haltpoint overlap=True": haltpoint_way(True),
}


def run_loop(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    steps: int,
    every: int,
    save: Save | None,
    gate: Any = None,
) -> tuple[float, list[float]]:
    """Seconds for `steps` training steps with `save` every `every` steps (and a first save
    before the clock starts: buffers allocated, files warm); the time each save blocked the
    loop (with `gate`, the overlapped save's, the waits of `optimizer.step()` shared out)."""

    def one_step() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    one_step()
    if save is not None:
        save(10**6)
    one_step()
    blocked = []
    waited = 0.0 if gate is None else gate.waited
    start = time.perf_counter()
    for step in range(steps):
        one_step()
        if save is not None and step % every == every - 1:
            t = time.perf_counter()
            save(step)
            blocked.append(time.perf_counter() - t)
    seconds = time.perf_counter() - start
    if gate is not None and blocked:
        share = (gate.waited - waited) / len(blocked)
        blocked = [b + share for b in blocked]
    return seconds, blocked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=128, help="weights, MiB of float32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder on the disk")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="haltpoint-loop-", dir=args.dir))
    try:
        report(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(root: Path, args: argparse.Namespace) -> None:
    model, opt = make(args.mib)
    x = torch.randn(args.batch, WIDTH)
    run_loop(model, opt, x, 2, 1, None)  # AdamW's state exists from here on
    size, copy = state_bytes(model, opt), memcpy_seconds(model, opt)
    print(
        f"state {size / 2**20:.0f} MiB (weights + AdamW), one in-memory copy {copy * 1e3:.0f} ms; "
        f"{args.steps} steps, batch {args.batch}, {args.rounds} rounds"
    )
    print(f"{'every':>5} {'way':<24} {'s/step':>7} {'loss':>7} {'spread':>15} {'blocked':>9} "
          f"{'x memcpy':>8}")  # fmt: skip
    for every in (10, 1):
        times: dict[str, list[float]] = {name: [] for name in ["no saving", *WAYS]}
        blocks: dict[str, list[float]] = {name: [] for name in WAYS}
        for r in range(args.rounds):
            times["no saving"].append(run_loop(model, opt, x, args.steps, every, None)[0])
            for name, way in WAYS.items():
                folder = root / f"{every}-{r}-{name.split()[0]}"
                folder.mkdir()
                with way(folder, model, opt) as (save, gate):
                    seconds, blocked = run_loop(model, opt, x, args.steps, every, save, gate)
                times[name].append(seconds)
                blocks[name] += blocked
                shutil.rmtree(folder)
        base = times["no saving"]
        for name, seconds in times.items():
            losses = [t / b - 1 for t, b in zip(seconds, base, strict=True)]
            held = statistics.median(blocks[name]) if blocks.get(name) else 0.0
            print(
                f"{every:>5} {name:<24} {statistics.median(seconds) / args.steps:>7.3f} "
                f"{statistics.median(losses) * 100:>6.1f}% "
                f"{min(losses) * 100:>6.1f}..{max(losses) * 100:>5.1f}% "
                f"{held * 1e3:>7.1f}ms {held / copy:>8.2f}"
            )


if __name__ == "__main__":
    main()
