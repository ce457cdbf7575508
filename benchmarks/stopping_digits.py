"""Stopping rules on a second family of real curves: small networks trained on the shipped digits.

Run from anywhere: `python benchmarks/stopping_digits.py [--runs 400] [--jobs 2]`. It trains
`--runs` seeded configurations on the UCI digits that ship with haltpoint (no download), and
caches their curves under /tmp (never in the repository), so a second run only replays.

Why a second family: DeepOBS (`stopping_quality.py`) trains at a constant learning rate and
watches the test loss itself (it has no validation split), so a late lucky value of the watched
metric is a late lucky value of the judged one. These runs differ on both counts: each draws a
model (one- or two-layer MLP, small CNN, widths 16-512), an optimizer (SGD, momentum, Adam,
AdamW; log-uniform learning rate, weight decay), a schedule (constant, cosine, warm-up and
cosine, step, linear decay to the end), a batch size, a training-set size (200-1,097
images, so that some overfit) and a length (20-120 epochs); every epoch it records the loss and
accuracy on a validation split and on a separate test split (350 images each).

Each rule watches the validation loss; where it stops at index s the run keeps its best
checkpoint by validation loss among 0..s. Regret is the relative loss of test accuracy of that
checkpoint against the one the whole run would keep (and, in brackets, of test loss); "saved"
is `1 - s / (len - 1)`, and the oracle stops at the best validation loss. Targets as for
DeepOBS: at least 75% of the oracle's saving, mean regret at most 0.3%, at most 1.5% of runs
losing more than 1%. No constant of haltpoint is chosen on these runs: they only check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from haltpoint import EarlyStopping
from haltpoint.demo import load_digits
from haltpoint.stopping.adaptive import DEFAULT_SETTINGS, PLANNED_SETTINGS
from haltpoint.stopping.bands import BANDS
from stopping_tuning import stop_index

CACHE = Path("/tmp/haltpoint-digits-curves-v1")
HELD = 350  # images in each of the validation and test splits


def _model(rng: np.random.Generator) -> tuple[str, torch.nn.Module]:
    kind = str(rng.choice(["mlp1", "mlp2", "cnn"]))
    width = int(rng.choice([16, 64, 256, 512]))
    nn = torch.nn
    if kind == "mlp1":
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, width), nn.ReLU()]
        return f"{kind}-{width}", nn.Sequential(*layers, nn.Linear(width, 10))
    if kind == "mlp2":
        layers = [nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
        return f"{kind}-{width}", nn.Sequential(*layers, nn.Linear(width, 10))
    c = max(4, width // 16)
    layers = [nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, padding=1)]
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * c * 16, 10)]
    return f"{kind}-{width}", nn.Sequential(*layers)


def _schedule(name: str, total: int) -> Callable[[int], float]:
    warm = int(0.05 * total) if name == "warmup_cosine" else 0

    def factor(step: int) -> float:
        if name == "constant":
            return 1.0
        if name == "step":
            return 0.1 ** (step // max(1, int(0.4 * total)))
        if name == "linear":
            return max(0.0, 1.0 - step / total)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


def train_one(seed: int) -> dict[str, Any]:
    """Train configuration `seed` and return its settings and per-epoch curves."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    images, labels = load_digits()
    epochs = int(rng.choice([20, 30, 50, 50, 80, 120]))
    n_train = int(rng.choice([200, 400, 800, len(images) - 2 * HELD]))
    order = torch.from_numpy(rng.permutation(len(images)))
    val, test = order[n_train : n_train + HELD], order[n_train + HELD : n_train + 2 * HELD]
    train = order[:n_train]
    name, model = _model(rng)
    opt_name = str(rng.choice(["sgd", "momentum", "adam", "adamw"]))
    adaptive = opt_name in ("adam", "adamw")
    lr = float(10 ** (rng.uniform(-4, -1.5) if adaptive else rng.uniform(-2.5, 0.5)))
    decay = float(rng.choice([0.0, 0.0, 1e-4, 1e-2]))
    params = model.parameters()
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, weight_decay=decay)
    elif opt_name == "momentum":
        opt = torch.optim.SGD(params, lr=lr / 10, momentum=0.9, weight_decay=decay)
    elif opt_name == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=max(decay, 1e-2))
    schedule = str(rng.choice(["constant", "cosine", "warmup_cosine", "step", "linear"]))
    batch = int(rng.choice([16, 32, 128]))
    total = epochs * math.ceil(n_train / batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(schedule, total))
    loss_fn = torch.nn.functional.cross_entropy
    curves: dict[str, list[float | None]] = {k: [] for k in ("val_loss", "val_acc", "test_loss")}
    curves["test_acc"] = []
    shuffle = torch.Generator().manual_seed(seed)

    def record(split: torch.Tensor, prefix: str) -> None:
        with torch.no_grad():
            out = model(images[split])
            loss = float(loss_fn(out, labels[split]))
            acc = float((out.argmax(1) == labels[split]).float().mean())
        curves[f"{prefix}_loss"].append(loss if math.isfinite(loss) else None)
        curves[f"{prefix}_acc"].append(acc)

    for _ in range(epochs):
        model.train()
        shuffled = train[torch.randperm(n_train, generator=shuffle)]
        for i in range(0, n_train, batch):
            b = shuffled[i : i + batch]
            opt.zero_grad()
            loss_fn(model(images[b]), labels[b]).backward()
            opt.step()
            scheduler.step()
        model.eval()
        record(val, "val")
        record(test, "test")
    config = {"model": name, "optimizer": opt_name, "lr": lr, "weight_decay": decay}
    config |= {"schedule": schedule, "batch": batch, "train": n_train, "epochs": epochs}
    return {"seed": seed, **config, **curves}


def load_runs(count: int, jobs: int) -> list[dict[str, Any]]:
    """Runs 0..count-1, trained now where the cache lacks them."""
    CACHE.mkdir(parents=True, exist_ok=True)
    missing = [s for s in range(count) if not (CACHE / f"{s}.json").exists()]
    if missing:
        print(f"training {len(missing)} of {count} runs ({jobs} processes) ...", flush=True)
        started = time.perf_counter()
        with ProcessPoolExecutor(jobs) as pool:
            for run in pool.map(train_one, missing, chunksize=4):
                tmp = CACHE / f"{run['seed']}.json.tmp"
                tmp.write_text(json.dumps(run))
                tmp.replace(CACHE / f"{run['seed']}.json")
        print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)
    return [json.loads((CACHE / f"{s}.json").read_text()) for s in range(count)]


def patience_stop(values: list[float], patience: int) -> int:
    """Where `EarlyStopping(patience=patience)` stops (or the last index)."""
    stopper = EarlyStopping(patience=patience)
    return next((i for i, x in enumerate(values) if stopper.step(x)), len(values) - 1)


#: The default without a horizon before its calm fast lane (stop 35), for comparison.
BEFORE_CALM_LANE = dataclasses.replace(
    DEFAULT_SETTINGS,
    tolerance=0.005,
    fast_share=0.0,
    fast_open=2.0,
    fast_noise_k=3.0,
    descent_z=3.0,
)

RULES: dict[str, Callable[[list[float]], int]] = {
    "default (no horizon)": lambda v: stop_index(v, DEFAULT_SETTINGS, None),
    "default before the calm lane": lambda v: stop_index(v, BEFORE_CALM_LANE, None),
    "default, horizon": lambda v: stop_index(v, PLANNED_SETTINGS, len(v)),
    "patience=5": lambda v: patience_stop(v, 5),
    "patience=10": lambda v: patience_stop(v, 10),
    "patience=20": lambda v: patience_stop(v, 20),
}


def outcomes(run: dict[str, Any], stop: int) -> tuple[float, float, float, float]:
    """(saved, oracle's saving, test-accuracy regret, test-loss regret) of stopping at `stop`."""
    values = [math.inf if x is None else x for x in run["val_loss"]]
    n = len(values)
    ref, kept = int(np.argmin(values)), int(np.argmin(values[: stop + 1]))
    acc, loss = run["test_acc"], [math.inf if x is None else x for x in run["test_loss"]]
    acc_regret = (acc[ref] - acc[kept]) / acc[ref] if acc[ref] > 0 else 0.0
    loss_regret = (loss[kept] - loss[ref]) / abs(loss[ref]) if math.isfinite(loss[ref]) else 0.0
    return 1 - stop / (n - 1), 1 - ref / (n - 1), min(acc_regret, 1.0), min(loss_regret, 1.0)


def table(runs: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: one per rule and band."""
    lines = [
        "| rule | band | runs | % epochs saved (share of oracle) | mean regret % | regret > 1% "
        "| test-loss regret % | test-loss regret > 1% |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    watched = [[math.inf if x is None else x for x in r["val_loss"]] for r in runs]
    for name, rule in RULES.items():
        rows = [(len(v), outcomes(r, rule(v))) for r, v in zip(runs, watched, strict=True)]
        for label, low, high in BANDS:
            picked = np.array([o for n, o in rows if low <= n <= high])
            if not len(picked):
                continue
            saved, oracle, acc, loss = picked.T
            share = saved.sum() / oracle.sum() if oracle.sum() else math.nan
            lines.append(
                f"| {name} | {label} | {len(picked)} | {100 * saved.mean():.1f} "
                f"({100 * share:.0f}%) | {100 * acc.mean():.2f} | {100 * (acc > 0.01).mean():.1f}% "
                f"| {100 * loss.mean():.2f} | {100 * (loss > 0.01).mean():.1f}% |"
            )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=400, help="configurations (default 400)")
    parser.add_argument("--jobs", type=int, default=2, help="training processes (default 2)")
    args = parser.parse_args(argv[1:])
    if args.runs < 1 or args.jobs < 1:
        parser.error("--runs and --jobs must be >= 1")
    started = time.perf_counter()
    runs = load_runs(args.runs, args.jobs)
    print("\n".join(table(runs)))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
