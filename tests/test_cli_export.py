"""`haltpoint export` (weights as safetensors) and `haltpoint gc` (offline retention)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.stopping import EarlyStopping


def make_run(path: Path, values=(0.5, 0.3, 0.4, 0.35), with_stopper: bool = True) -> None:
    """Checkpoints 0..3 of a Linear whose weight equals its step, val_loss from `values`."""
    model = torch.nn.Linear(3, 2)
    stopper = EarlyStopping("val_loss", patience=5)
    with Checkpointer(path, keep_last=10, async_save=False, capture_rng=False) as ckpt:
        for step, value in enumerate(values):
            with torch.no_grad():
                model.weight.fill_(float(step))
            metrics = {"val_loss": value, "val_acc": 1 - value}
            state: dict = {"model": model, "epoch": step}
            if with_stopper:
                stopper.step(metrics)
                state["stopper"] = stopper
            ckpt.save(step, state, metrics)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def steps_on_disk(path: Path) -> list[int]:
    """The committed steps: folders with a manifest (a removed one may leave shared files)."""
    return sorted(int(p.parent.name.split("-")[1]) for p in path.glob("step-*/manifest.json"))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    make_run(tmp_path / "run")
    return tmp_path / "run"


# -- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("which", "step"), [("best", 1), ("latest", 3), ("2", 2)])
def test_export_loads_with_safetensors_and_into_the_model(
    run_dir: Path, tmp_path: Path, capsys, which: str, step: int
):
    out_file = tmp_path / "model.safetensors"
    code, out, _ = run_cli(capsys, "export", str(run_dir), "--which", which, "-o", str(out_file))
    assert code == 0
    assert f"exported 2 tensors (32 B) of 'model' from step {step}" in out
    tensors = safetensors.torch.load_file(str(out_file))
    assert sorted(tensors) == ["bias", "weight"]  # the entry's prefix stripped
    model = torch.nn.Linear(3, 2)
    model.load_state_dict(tensors)
    assert torch.equal(model.weight, torch.full((2, 3), float(step)))
    with safetensors.safe_open(str(out_file), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_export_never_writes_through_a_link_at_its_temporary_name(
    run_dir: Path, tmp_path: Path, capsys
):
    manifest = run_dir / "step-000000003" / "manifest.json"
    before = manifest.read_bytes()
    out_file = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.tmp").symlink_to(manifest)  # the name export used to write
    code, _, _ = run_cli(capsys, "export", str(run_dir), "-o", str(out_file))
    assert code == 0 and manifest.read_bytes() == before
    assert sorted(safetensors.torch.load_file(str(out_file))) == ["bias", "weight"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors",
        "model.safetensors.tmp",
        "run",
    ]


def test_export_best_without_a_stopper_needs_a_monitor(tmp_path: Path, capsys):
    make_run(tmp_path / "run", with_stopper=False)
    target = str(tmp_path / "m.safetensors")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "run"), "-o", target)
    assert code == 2
    assert "cannot tell which metric ranks the checkpoints: they hold val_acc, val_loss" in err
    assert "--monitor NAME" in err
    code, out, _ = run_cli(
        capsys, "export", str(tmp_path / "run"), "-o", target, "--monitor", "val_acc"
    )
    assert code == 0 and "from step 1" in out  # val_acc is maximised: 0.7 at step 1


def export_latest_key(capsys, run: Path, key: str, target: Path) -> tuple[int, str, str]:
    """`haltpoint export RUN --which latest --key KEY -o TARGET`."""
    return run_cli(capsys, "export", str(run), "--which", "latest", "--key", key, "-o", str(target))


def test_export_key_takes_numpy_arrays_as_tensors(tmp_path: Path, capsys):
    """An entry of NumPy arrays (features, a codebook) holds weights too: it said "holds no
    tensors"."""
    import numpy as np
    from safetensors.torch import load_file

    codebook = {"centers": np.arange(6, dtype=np.float32).reshape(3, 2), "counts": [1, 2]}
    with Checkpointer(tmp_path / "run", async_save=False) as ckpt:
        ckpt.save(1, {"codebook": codebook, "model": torch.nn.Linear(2, 1)})
    target = tmp_path / "codebook.safetensors"
    code, out, _ = export_latest_key(capsys, tmp_path / "run", "codebook", target)
    assert code == 0, out
    exported = load_file(target)
    assert list(exported) == ["centers"]
    assert torch.equal(exported["centers"], torch.arange(6, dtype=torch.float32).reshape(3, 2))


def test_export_errors(run_dir: Path, tmp_path: Path, capsys):
    target = str(tmp_path / "m.safetensors")
    code, _, err = run_cli(capsys, "export", str(run_dir), "--key", "opt", "-o", target)
    assert code == 2
    assert "--key 'opt' is not an entry of the checkpoint of step 1" in err
    assert "epoch, model, stopper" in err
    code, _, err = run_cli(capsys, "export", str(run_dir), "--key", "epoch", "-o", target)
    assert code == 2 and "entry 'epoch' of step 1 holds no tensors" in err
    code, _, err = run_cli(capsys, "export", str(run_dir), "-o", str(tmp_path / "m.pt"))
    assert code == 2 and "-o must name a file ending with .safetensors" in err
    code, _, err = run_cli(capsys, "export", str(run_dir), "--which", "soon", "-o", target)
    assert code == 2 and "argument --which: must be best, latest or a step" in err
    code, _, err = run_cli(capsys, "export", str(run_dir), "--which", "9", "-o", target)
    assert code == 1 and "no intact checkpoint for step 9" in err


def test_export_refuses_a_damaged_checkpoint(run_dir: Path, tmp_path: Path, capsys):
    data = run_dir / "step-000000001" / "tensors.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    target = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "export", str(run_dir), "-o", str(target))
    assert code == 1 and "step-000000001/tensors.safetensors" in err and "damaged" in err
    assert not target.exists()


def test_a_missing_tensor_file_is_said_as_verify_says_it(run_dir: Path, tmp_path: Path, capsys):
    """export (and restore) said "[Errno 2] No such file or directory: '...'", the path twice
    and the errno that no other message shows."""
    (run_dir / "step-000000001" / "tensors.safetensors").unlink()
    target = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "export", str(run_dir), "--which", "1", "-o", str(target))
    assert code == 1 and err.count("\n") == 1, err
    assert "step-000000001/tensors.safetensors: tensor 'model.bias': the file is missing;" in err
    assert "Errno" not in err and not target.exists()


@pytest.mark.parametrize(
    ("weights", "name"),
    [
        ({"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}}, "a.b"),
        ({"__metadata__": torch.zeros(2)}, "__metadata__"),
    ],
    ids=["two-tensors-one-name", "the-header-field"],
)
def test_export_refuses_names_no_safetensors_file_can_hold(
    tmp_path: Path, capsys, weights: dict, name: str
):
    with Checkpointer(tmp_path / "run", async_save=False, capture_rng=False) as ckpt:
        ckpt.save(0, {"weights": weights})
    target = tmp_path / "w.safetensors"
    code, _, err = export_latest_key(capsys, tmp_path / "run", "weights", target)
    assert code == 1 and err.count("\n") == 1
    assert f"cannot export a tensor named {name!r}" in err
    assert not target.exists()  # no file that drops a tensor or that safetensors refuses


# -- gc ---------------------------------------------------------------------------------------


def test_gc_dry_run_removes_nothing(run_dir: Path, capsys):
    code, out, _ = run_cli(capsys, "gc", str(run_dir), "--keep-last", "1", "--dry-run")
    assert code == 0
    assert "would remove step 0" in out and "would remove step 2" in out
    assert "dry run: would remove 3 checkpoint(s)" in out and "keep steps 3" in out
    assert steps_on_disk(run_dir) == [0, 1, 2, 3]


def test_gc_keeps_the_union_of_latest_and_best(run_dir: Path, capsys):
    code, out, _ = run_cli(capsys, "gc", str(run_dir), "--keep-last", "1", "--keep-best", "1")
    assert code == 0
    assert "removed 2 checkpoint(s)" in out and "kept steps 1, 3" in out
    assert steps_on_disk(run_dir) == [1, 3]
    code, out, _ = run_cli(capsys, "ls", str(run_dir), "--json")
    assert [r["step"] for r in json.loads(out)] == [1, 3]
    assert main(["verify", str(run_dir)]) == 0


def test_gc_keep_every_and_pinned(run_dir: Path, capsys):
    with Checkpointer(run_dir, keep_last=10) as ckpt:
        ckpt.pin(1)
    code, _, _ = run_cli(capsys, "gc", str(run_dir), "--keep-last", "1", "--keep-every", "2")
    assert code == 0
    assert steps_on_disk(run_dir) == [0, 1, 2, 3]  # 0 and 2 every-2, 1 pinned, 3 latest
    run_cli(capsys, "gc", str(run_dir), "--keep-last", "1")
    assert steps_on_disk(run_dir) == [1, 3]


def test_gc_refuses_while_a_writer_holds_the_lock(run_dir: Path, capsys):
    with Checkpointer(run_dir, keep_last=10):
        code, _, err = run_cli(capsys, "gc", str(run_dir), "--keep-last", "1")
    assert code == 1
    assert err.startswith("haltpoint: error: run directory") and "is locked by process" in err
    assert steps_on_disk(run_dir) == [0, 1, 2, 3]


def test_gc_needs_something_to_keep(run_dir: Path, capsys):
    code, _, err = run_cli(capsys, "gc", str(run_dir))
    assert code == 2 and "say what to keep: --keep-last N" in err
    code, _, err = run_cli(capsys, "gc", str(run_dir), "--keep-last", "0")
    assert code == 2 and "argument --keep-last: must be an int >= 1" in err
    assert steps_on_disk(run_dir) == [0, 1, 2, 3]
