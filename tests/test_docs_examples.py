"""Every ```python block of README.md and docs/*.md runs as written, so that an example cannot
silently rot.

Each block runs in a fresh folder, in a namespace holding only what a reader adds around it
(`SCAFFOLD`: a tiny model, its optimizer and scheduler, a loader, `train_one_epoch`,
`evaluate`, ...), after the blocks of the same page it continues (`CONTINUES`). A block not
listed anywhere runs with the scaffold alone: a new example is tested by default. `SKIPPED`
names the few that cannot run here, and why.
"""

from __future__ import annotations

import importlib.util
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

SCAFFOLD = """
import random
import types

import torch
from torch import nn

torch.manual_seed(0)
random.seed(0)


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, batch):
        x, y = batch
        return types.SimpleNamespace(loss=nn.functional.mse_loss(self.net(x), y))


model = TinyModel()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5)
scaler = torch.amp.GradScaler("cpu")
X = torch.randn(64, 4)
loader = [(X[i : i + 16], X[i : i + 16].sum(1, keepdim=True)) for i in range(0, 64, 16)]
dataset = torch.utils.data.TensorDataset(X, X.sum(1, keepdim=True))
batch = loader[0]
max_epochs = epochs = 30
first_step = epoch = step = 0
state = {"model": model, "optimizer": optimizer}
metrics = {"val_loss": 0.5}
val_loss = 0.5
_evaluations = [0]


def train_step(batch):
    optimizer.zero_grad()
    model(batch).loss.backward()
    optimizer.step()


def train_one_epoch(*args, **kwargs):
    for b in loader:
        train_step(b)


def evaluate(*args, **kwargs):  # a curve with its best at evaluation 8, then overfitting
    i = _evaluations[0]
    _evaluations[0] += 1
    loss = 0.1 + (i - 8) ** 2 / 100
    return {"val_loss": loss, "val_acc": 1 / (1 + loss)}


def train_one_epoch_and_evaluate():
    return random.random()
"""

_GUIDE_STOPPER = 'stopper = EarlyStopping("val_loss", mode="min", patience=5, min_delta=0.001)'
CONTINUES = {
    # a line of a block: a line of each block of the same page it follows on from, in order
    '"scaler": scaler,          # torch.amp.GradScaler': [_GUIDE_STOPPER],
    "info = ckpt.restore(state)                  # the newest intact checkpoint, or None": [
        _GUIDE_STOPPER,
        '"scaler": scaler,          # torch.amp.GradScaler',
    ],
    'resumed = EarlyStopping("val_loss", patience=5)': [_GUIDE_STOPPER],
    "n_trials=max(0, 50 - len(done))": ["study.optimize(objective, n_trials=50)"],
}

_IMPORT_CHECKPOINTER = "from haltpoint import Checkpointer\n"
SETUP = {
    # a line of a block: what the page made before it, where running that block would not do
    'with Checkpointer("runs/exp1", save_on_signal=': _IMPORT_CHECKPOINTER,
    'ckpt = Checkpointer("runs/exp1", monitor="val_loss", every="auto"': _IMPORT_CHECKPOINTER,
    'ckpt = Checkpointer("runs/exp1", monitor="val_loss", overlap=True)': _IMPORT_CHECKPOINTER,
    'stopper = EarlyStopping("val_loss", mode="min")  ': "from haltpoint import EarlyStopping\n",
    "model.load_state_dict(safetensors.torch.load_file(": (
        "import safetensors.torch\n"
        "from haltpoint.demo.model import DigitsNet\n"
        'safetensors.torch.save_file(DigitsNet().state_dict(), "model.safetensors")\n'
    ),
    # a loop whose evaluate() returns the value, not a mapping
    'stopper.step({"val_loss": evaluate(model)})': (
        '_evaluate = evaluate\ndef evaluate(*args):\n    return _evaluate()["val_loss"]\n'
    ),
}

EXPECTED = {
    # a line of a block: what must hold once it ran (the scaffold's curve is best at 8)
    'ckpt.restore({"model": model}, "best")     # best weights back, however training ended': (
        "stopper.stopped and stopper.best_step == 8 and ckpt.list()[-1].step == 13"
    ),
    "        print(decision.reason)\n        # val_loss did not improve by more than 0.001": (
        "decision.stop and decision.best_step == 8"
    ),
    'print(f"best weights from step {best.step}: {best.metrics}")': "best.step == 8",
    # a rerun of the same block on the stored study runs no trial
    "n_trials=max(0, 50 - len(done))": (
        "len(study.trials) == 50 and (exec(_code, globals()) or len(study.trials) == 50)"
    ),
}

SKIPPED = {
    "fully_shard(model)": "FSDP2 needs a process group of ranks: tests/test_sharded*.py",
    '"s3://my-bucket/runs/exp1"': "needs an S3 bucket: tests/test_store_s3.py",
    "class Model(pl.LightningModule):": "the user's LightningModule and data (`...`)",
    "from transformers import Trainer": "the user's transformers model and data sets",
    '{"version": 1, "monitor": "val_loss"': "a state dict shown, `{...}` elided: not code",
}

NEEDS = {"import optuna": "optuna"}


def _blocks() -> Iterator[tuple[str, str, list[str]]]:
    for page in PAGES:
        text = page.read_text()
        blocks = [(m.group(1), text[: m.start()].count("\n") + 1) for m in _BLOCK.finditer(text)]
        for code, line in blocks:
            yield f"{page.relative_to(ROOT)}:{line}", code, [c for c, _ in blocks]


_CASES = list(_blocks())


def _find(codes: list[str], line: str) -> str:
    found = [code for code in codes if line in code]
    assert len(found) == 1, f"{line!r} is in {len(found)} blocks of the page, not one"
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(code: str, name: str, namespace: dict[str, Any]) -> None:
    exec(compile(code, name, "exec"), namespace)


@pytest.mark.parametrize(("where", "code", "page"), _CASES, ids=[c[0] for c in _CASES])
def test_doc_example_runs(
    where: str, code: str, page: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for line, why in SKIPPED.items():
        if line in code:
            pytest.skip(why)
    for line, module in NEEDS.items():
        if line in code and importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__doc_example__"}
    _run(SCAFFOLD, "scaffold", namespace)
    for line, earlier in CONTINUES.items():
        if line in code:
            for first in earlier:
                _run(_find(page, first), f"{where} (the block before it)", namespace)
    for line, setup in SETUP.items():
        if line in code:
            _run(setup, f"{where} (setup)", namespace)
    distributed = 'dist.init_process_group("gloo")' in code
    if distributed:  # one rank, as torchrun would set it up
        for key, value in {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "RANK": "0",
            "WORLD_SIZE": "1",
        }.items():
            monkeypatch.setenv(key, value)
    try:
        _run(code, where, namespace)
        namespace["_code"] = code  # an expectation may run the block again (a rerun)
        for line, expected in EXPECTED.items():
            if line in code:
                assert eval(expected, namespace), f"after {where}: not {expected}"
    finally:
        for value in list(namespace.values()):
            close = getattr(value, "close", None)
            if type(value).__name__ == "Checkpointer" and close is not None:
                close()
        if distributed:
            torch.distributed.destroy_process_group()


def test_every_line_the_tables_name_is_in_a_block() -> None:
    """A table entry whose block was edited away would quietly stop doing its job."""
    for table in (CONTINUES, SETUP, EXPECTED, SKIPPED, NEEDS):
        for line in table:
            assert any(line in code for _, code, _ in _CASES), f"no block holds {line!r}"
