"""Checkpoint speed, side by side: haltpoint against dd, torch.save, safetensors and torch DCP.

Run: python benchmarks/checkpoint_speed.py [--size-gib 1] [--dir PATH] [--repeat 3]

One run measures, on the same state (16 Linear layers, `--size-gib` of float32 weights, every
weight changed before each save): raw `dd oflag=direct` bandwidth; the time to a durable
commit, the time the training loop is blocked and the peak extra memory (RSS sampled in a
thread) of each way to save; restore time from cold files against `torch.load`; bytes written
per save with 15 of 16 layers frozen. Results are medians over `--repeat` saves after one
warm-up save each. Then the training-loop part (`benchmarks/training_loop.py`, with its
defaults): throughput loss with a save every 10 steps and every step, for torch.save, DCP's
async_save, haltpoint's async save and its overlapped save, with the spread over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import training_loop  # benchmarks/ is the script's folder, first on sys.path
from haltpoint import Checkpointer
from haltpoint.store.storage import LocalStorage
from haltpoint.store.tensor_reader import read_tensors

LAYERS = 16
GiB = 1 << 30


class PeakRSS:
    """Samples this process's resident memory every millisecond; `peak` is the highest seen."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def make_model(size_gib: float) -> torch.nn.Sequential:
    d = int((size_gib * GiB / LAYERS / 4) ** 0.5) // 64 * 64
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layer = torch.nn.Linear(d, d)
        with torch.no_grad():
            layer.weight.normal_(0, d**-0.5)
        layers.append(layer)
    return torch.nn.Sequential(*layers)


def nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def touch(model: torch.nn.Module, only: torch.nn.Module | None = None) -> None:
    """Change every weight (of `only`, when given), as a training step would."""
    with torch.no_grad():
        for p in (only or model).parameters():
            p.add_(1e-3)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(root: Path) -> None:
    """Drop the page cache of every file under `root` (and all caches where allowed)."""
    can_drop_caches()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# -- savers: each returns (blocked seconds, total seconds) ------------------------------------


def dd_bandwidth(root: Path, size: int) -> float:
    target = root / "dd.bin"
    count = max(1, size // (64 << 20))
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=64M", f"count={count}", "oflag=direct"],
        check=True,
        capture_output=True,
    )
    fsync_file(target)
    seconds = time.perf_counter() - start
    target.unlink()
    return count * (64 << 20) / seconds


def torch_save(model: torch.nn.Module, path: Path) -> tuple[float, float]:
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(model.state_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    total = time.perf_counter() - start
    return total, total


def safetensors_save(model: torch.nn.Module, path: Path) -> tuple[float, float]:
    start = time.perf_counter()
    safetensors.torch.save_file(model.state_dict(), str(path))
    fsync_file(path)
    total = time.perf_counter() - start
    return total, total


def dcp_save(model: torch.nn.Module, path: Path) -> tuple[float, float]:
    start = time.perf_counter()
    dcp.save(model.state_dict(), checkpoint_id=str(path))
    total = time.perf_counter() - start
    return total, total


def dcp_async_save(model: torch.nn.Module, path: Path) -> tuple[float, float]:
    start = time.perf_counter()
    future = dcp.async_save(model.state_dict(), checkpoint_id=str(path))
    blocked = time.perf_counter() - start
    future.result()  # type: ignore[union-attr]
    return blocked, time.perf_counter() - start


def haltpoint_saver(ckpt: Checkpointer) -> Callable[[torch.nn.Module, Path], tuple[float, float]]:
    step = iter(range(10**9))

    def save(model: torch.nn.Module, path: Path) -> tuple[float, float]:
        start = time.perf_counter()
        ckpt.save(next(step), {"model": model})
        blocked = time.perf_counter() - start
        ckpt.wait()
        return blocked, time.perf_counter() - start

    return save


@contextlib.contextmanager
def scratch(root: Path, name: str) -> Iterator[Path]:
    path = root / name
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def measure(
    model: torch.nn.Module, folder: Path, saver: Callable[..., tuple[float, float]], repeat: int
) -> dict[str, float]:
    """Warm-up save, then `repeat` measured saves; peak extra RSS over the whole sequence."""
    base = PeakRSS().now()
    blocked, total = [], []
    with PeakRSS() as rss:
        for i in range(repeat + 1):
            touch(model)
            target = folder / f"save-{i}"
            b, t = saver(model, target)
            if i:
                blocked.append(b)
                total.append(t)
            if i >= 1:  # keep the newest for the restore measurement
                for old in folder.glob(f"save-{i - 1}*"):
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
    return {
        "blocked": statistics.median(blocked),
        "total": statistics.median(total),
        "extra": rss.peak - base,
        "first_blocked": b if repeat == 0 else blocked[0],
    }


# -- restore -----------------------------------------------------------------------------------


def time_restore(root: Path, fn: Callable[[], object]) -> float:
    evict(root)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_haltpoint_restore(model: torch.nn.Module, folder: Path) -> tuple[float, float]:
    """`Checkpointer.restore`, and `read_tensors(into=...)` straight into the parameters."""
    run_dir = folder / "run"
    full = time_restore(
        folder, lambda: Checkpointer(run_dir, read_only=True).restore({"model": model})
    )
    manifest = Checkpointer(run_dir, read_only=True)._run.committed()[-1].manifest
    assert manifest is not None
    into = {f"model.{k}": v for k, v in model.state_dict().items()}
    in_place = time_restore(
        folder, lambda: read_tensors(LocalStorage(run_dir), manifest.tensors, into=into)
    )
    return full, in_place


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder on the disk")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    repo = Path(__file__).resolve().parent.parent
    parent = args.dir
    if parent is None:  # the repo's disk; /tmp only when it is that same disk (not a tmpfs)
        same = os.stat(tempfile.gettempdir()).st_dev == os.stat(repo).st_dev
        parent = Path(tempfile.gettempdir()) if same else repo
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="haltpoint-bench-", dir=parent))
    try:
        run(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args: argparse.Namespace) -> None:
    model = make_model(args.size_gib)
    size = nbytes(model)
    rows: list[tuple[str, str, str, str]] = []
    print(f"state: {LAYERS} layers, {size / GiB:.2f} GiB float32; scratch folder {root}")

    dd = statistics.median(dd_bandwidth(root, size) for _ in range(args.repeat))
    copies = [t.clone() for t in model.state_dict().values()]  # one in-memory copy, reused
    start = time.perf_counter()
    for dst, src in zip(copies, model.state_dict().values(), strict=True):
        dst.copy_(src)
    memcpy = time.perf_counter() - start
    del copies
    print(f"  dd: {dd / 1e9:.2f} GB/s", flush=True)
    rows.append(("raw disk: dd oflag=direct", f"{dd / 1e9:.2f} GB/s", "1.00x", ""))
    rows.append(("one in-memory copy of the state", f"{memcpy:.3f} s", "", ""))

    results: dict[str, dict[str, float]] = {}
    with scratch(root, "torch") as folder:
        results["torch.save + fsync"] = measure(
            model, folder, lambda m, p: torch_save(m, p.with_suffix(".pt")), args.repeat
        )
        pt_file = next(folder.glob("*.pt"))
        restore_torch = time_restore(
            folder, lambda: model.load_state_dict(torch.load(pt_file, weights_only=True))
        )
    with scratch(root, "st") as folder:
        results["safetensors save_file + fsync"] = measure(
            model, folder, lambda m, p: safetensors_save(m, p.with_suffix(".st")), args.repeat
        )
        st_file = next(folder.glob("*.st"))
        restore_st = time_restore(
            folder, lambda: model.load_state_dict(safetensors.torch.load_file(str(st_file)))
        )
    print("  torch.save, safetensors: done", flush=True)
    with scratch(root, "dcp") as folder:
        results["torch DCP save"] = measure(model, folder, dcp_save, args.repeat)
    with scratch(root, "dcp-async") as folder:
        results["torch DCP async_save"] = measure(model, folder, dcp_async_save, args.repeat)
    dd_around: list[float] = []
    for name, async_save in (("haltpoint sync", False), ("haltpoint async", True)):
        if async_save:
            dd_around.append(dd_bandwidth(root, size))
        with scratch(root, name.replace(" ", "-")) as folder:
            # keep every measured save: like the others, no deletion inside the timed window
            ckpt = Checkpointer(folder / "run", async_save=async_save, keep_last=args.repeat + 2)
            results[name] = measure(model, folder, haltpoint_saver(ckpt), args.repeat)
            ckpt.close()
            if async_save:
                dd_around.append(dd_bandwidth(root, size))
            if async_save:
                restore_hp, restore_into = time_haltpoint_restore(model, folder)
        print(f"  {name}: done", flush=True)

    torch_total = results["torch.save + fsync"]["total"]
    for name, r in results.items():
        bw = size / r["total"]
        rows.append(
            (
                f"save: {name}",
                f"{r['total']:.2f} s to durable ({bw / 1e9:.2f} GB/s); blocked "
                f"{r['blocked']:.3f} s; peak extra RSS {r['extra'] / 2**20:.0f} MiB",
                f"{bw / dd:.2f}x dd, {torch_total / r['total']:.2f}x torch.save, "
                f"blocked {r['blocked'] / torch_total:.3f}x torch.save / "
                f"{r['blocked'] / memcpy:.1f}x copy",
                "",
            )
        )
    hp = results["haltpoint async"]
    near = statistics.mean(dd_around)
    rows.append(
        (
            "raw disk: dd right before / after haltpoint async",
            f"{dd_around[0] / 1e9:.2f} / {dd_around[1] / 1e9:.2f} GB/s",
            "",
            "",
        )
    )
    rows.append(
        (
            "target: commit bandwidth",
            f"{size / hp['total'] / 1e9:.2f} GB/s",
            f"{size / hp['total'] / near:.2f}x dd before/after, {size / hp['total'] / dd:.2f}x "
            f"dd at start, {torch_total / hp['total']:.2f}x torch.save",
            ">= 0.8x dd, >= 2x torch.save",
        )
    )
    rows.append(
        (
            "target: blocked time (async)",
            f"{hp['blocked']:.3f} s (first save {hp['first_blocked']:.3f} s)",
            f"{hp['blocked'] / torch_total:.3f}x torch.save, {hp['blocked'] / memcpy:.1f}x copy",
            "<= 0.1x torch.save, <= 2x copy",
        )
    )
    cold = "cold (drop_caches)" if can_drop_caches() else "cold (fadvise DONTNEED)"
    rows.append(("restore: torch.load(weights_only) + load", f"{restore_torch:.2f} s", cold, ""))
    rows.append(("restore: safetensors load_file + load", f"{restore_st:.2f} s", "", ""))
    rows.append(
        (
            "restore: haltpoint Checkpointer.restore",
            f"{restore_hp:.2f} s",
            f"{restore_torch / restore_hp:.2f}x torch.load",
            "",
        )
    )
    rows.append(
        (
            "restore: haltpoint read_tensors(into=params)",
            f"{restore_into:.2f} s",
            f"{restore_torch / restore_into:.2f}x torch.load",
            "",
        )
    )

    # -- frozen backbone: 15 of 16 layers never change -----------------------------------------
    with scratch(root, "frozen") as folder:
        run_dir = folder / "run"
        head = model[LAYERS - 1]
        changed = sum(t.numel() * t.element_size() for t in head.state_dict().values())
        written = []
        with Checkpointer(run_dir, keep_last=2) as ckpt:
            for step in range(args.repeat + 1):
                touch(model, only=head)
                ckpt.save(step, {"model": model})
                ckpt.wait()
                if step:
                    files = run_dir.glob(f"step-*{step}/*.safetensors")
                    written.append(sum(p.stat().st_size for p in files))
        per_save = statistics.median(written)
        rows.append(
            (
                "frozen 15/16 layers: bytes written per save",
                f"{per_save / 2**20:.1f} MiB (changed {changed / 2**20:.1f} MiB; torch.save "
                f"{size / 2**20:.0f} MiB)",
                f"{per_save / changed:.2f}x changed",
                "<= 1.25x changed",
            )
        )

    width = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("measurement", "value", "ratio", "target")
    print(" | ".join(h.ljust(w) for h, w in zip(header, width, strict=True)))
    print("-+-".join("-" * w for w in width))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, width, strict=True)))

    # training-loop throughput: torch.save, DCP async_save, haltpoint, haltpoint overlapped
    print()
    training_loop.report(root, argparse.Namespace(mib=128, batch=64, steps=40, rounds=3))


if __name__ == "__main__":
    main()
