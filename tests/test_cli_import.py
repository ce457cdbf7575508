"""`haltpoint import`: foreign checkpoints become haltpoint ones; hostile pickles never run."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.cli.importer import _write_import
from haltpoint.errors import CheckpointError, CheckpointExistsError, StepBehindError


class Hostile:
    """Unpickling this creates the file `marker`: arbitrary code from a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def exported(capsys, run: Path, tmp_path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    target = tmp_path / f"{key}.safetensors"
    code, _, err = run_cli(
        capsys, "export", str(run), "--which", "latest", "--key", key, "-o", str(target)
    )
    assert code == 0, err
    return safetensors.torch.load_file(str(target))


def test_import_a_torch_save_state_dict(tmp_path: Path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "import", str(tmp_path / "model.pt"), "-o", str(run))
    assert code == 0
    assert "(state dict) as step 0" in out and "entries model" in out
    weights = exported(capsys, run, tmp_path)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    fresh.load_state_dict(weights)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    assert main(["verify", str(run)]) == 0


def test_import_a_lightning_checkpoint(tmp_path: Path, capsys):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    ckpt = {
        "epoch": 4,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "callbacks": {"EarlyStopping": {"wait_count": 2}},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "import", str(tmp_path / "last.ckpt"), "-o", str(run))
    assert code == 0
    assert "(Lightning checkpoint) as step 120" in out
    assert "entries model, optimizer_states, lr_schedulers, trainer" in out
    assert "not imported: callbacks, pytorch-lightning_version" in err
    assert sorted(exported(capsys, run, tmp_path)) == ["net.bias", "net.weight"]
    code, out, _ = run_cli(capsys, "show", str(run), "--json")
    shown = json.loads(out)
    assert shown["step"] == 120
    assert shown["tree"]["trainer"]["content"] == {"epoch": 4, "global_step": 120}
    momentum = exported(capsys, run, tmp_path, key="optimizer_states")
    assert torch.equal(
        momentum["0.state.0.momentum_buffer"], optimizer.state_dict()["state"][0]["momentum_buffer"]
    )


def test_import_a_hugging_face_bin_with_a_step(tmp_path: Path, capsys):
    weights = {"bert.embeddings.weight": torch.randn(5, 4), "classifier.bias": torch.zeros(2)}
    torch.save(weights, tmp_path / "pytorch_model.bin")
    run = tmp_path / "run"
    argv = ["import", str(tmp_path / "pytorch_model.bin"), "-o", str(run), "--step", "7"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "as step 7" in out
    got = exported(capsys, run, tmp_path)
    assert all(torch.equal(got[k], v) for k, v in weights.items())
    code, _, err = run_cli(capsys, *argv)  # the same step again: never overwritten
    assert code == 1 and "--step 7 is not newer than the newest checkpoint" in err


@pytest.mark.parametrize(("step", "error"), [(3, CheckpointExistsError), (2, StepBehindError)])
def test_an_import_not_newer_than_the_newest_step_is_a_checkpoint_error(
    tmp_path: Path, step: int, error: type[CheckpointError]
):
    run = tmp_path / "run"
    with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, {"w": torch.zeros(2)})
    with pytest.raises(error, match=f"--step {step} is not newer") as raised:
        _write_import(str(run), step, {"fc.weight": torch.ones(2, 2)})
    assert raised.value.path == str(run)
    assert [info.step for info in Checkpointer(run, read_only=True).list()] == [1, 2, 3]


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_hostile_pickle_never_runs(tmp_path: Path, capsys, writer: str):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {"model": {"weight": torch.zeros(2)}, "extra": Hostile(marker)}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "import", str(evil), "-o", str(run))
    assert code == 1 and out == ""
    assert f"haltpoint: error: refused {evil}: it" in err
    assert "could run arbitrary code. Nothing from the file was run" in err
    if writer == "torch.save":
        assert "it asks for the Python object io.open" in err
    assert not marker.exists()
    assert not list(run.glob("step-*"))
    # The payload is real: an unsafe load would have created the marker.
    proof = tmp_path / "proof"
    torch.save({"extra": Hostile(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.exists()


def test_export_then_import_round_trips_through_safetensors(tmp_path: Path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    with Checkpointer(tmp_path / "first") as ckpt:
        ckpt.save(7, {"model": model, "epoch": 7})
    weights = exported(capsys, tmp_path / "first", tmp_path)  # model.safetensors
    again = tmp_path / "again"
    code, out, err = run_cli(
        capsys, "import", str(tmp_path / "model.safetensors"), "-o", str(again), "--step", "7"
    )
    assert code == 0, err
    assert "(safetensors file) as step 7" in out and "entries model" in out
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    with Checkpointer(again, read_only=True) as ckpt:
        assert ckpt.restore({"model": fresh}, 7) is not None
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor) and torch.equal(weights[name], tensor)
    assert main(["verify", str(again)]) == 0


def test_a_damaged_safetensors_file_is_refused(tmp_path: Path, capsys):
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file({"w": torch.ones(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    code, _, err = run_cli(capsys, "import", str(path), "-o", str(tmp_path / "r"))
    assert code == 1 and f"cannot read {path} as a safetensors file" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_import_errors(tmp_path: Path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    code, _, err = run_cli(capsys, "import", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "r"))
    assert code == 1 and f"cannot read {tmp_path / 'notes.txt'} as a torch.save file" in err
    torch.save([1, 2, 3], tmp_path / "list.pt")
    code, _, err = run_cli(capsys, "import", str(tmp_path / "list.pt"), "-o", str(tmp_path / "r"))
    assert code == 1 and "the file holds a list, not a mapping" in err
    torch.save({}, tmp_path / "empty.pt")
    code, _, err = run_cli(capsys, "import", str(tmp_path / "empty.pt"), "-o", str(tmp_path / "r"))
    assert code == 1 and "the file holds an empty dict; nothing to import" in err
    code, _, err = run_cli(capsys, "import", str(tmp_path / "none.pt"), "-o", str(tmp_path / "r"))
    assert code == 1 and "none.pt does not exist or is not a file" in err


def test_import_into_a_run_with_a_live_writer_is_refused(tmp_path: Path, capsys):
    torch.save({"w": torch.ones(1)}, tmp_path / "w.pt")
    with Checkpointer(tmp_path / "run"):
        argv = ["import", str(tmp_path / "w.pt"), "-o", str(tmp_path / "run")]
        code, _, err = run_cli(capsys, *argv)
    assert code == 1 and "is locked by process" in err


def test_import_into_an_existing_run_deletes_nothing(tmp_path: Path, capsys):
    run = tmp_path / "run"
    with Checkpointer(run, monitor="loss", keep_best=1, keep_last=2, async_save=False) as ckpt:
        for step, loss in [(1, 0.1), (2, 0.5), (3, 0.6)]:
            ckpt.save(step, {"w": torch.full((3,), float(step))}, {"loss": loss})
    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "plain.pt")
    code, out, _ = run_cli(
        capsys, "import", str(tmp_path / "plain.pt"), "-o", str(run), "--step", "999"
    )
    assert code == 0 and "3 earlier checkpoint folder(s) are untouched" in out
    steps = [info.step for info in Checkpointer(run, read_only=True).list()]
    assert steps == [1, 2, 3, 999]


@pytest.mark.parametrize("step", ["3", "2"])
def test_import_refuses_a_step_that_is_not_newer(tmp_path: Path, capsys, step: str):
    run = tmp_path / "run"
    with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, {"w": torch.zeros(2)})
    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "plain.pt")
    code, _, err = run_cli(
        capsys, "import", str(tmp_path / "plain.pt"), "-o", str(run), "--step", step
    )
    assert code != 0 and f"--step {step} is not newer than the newest checkpoint" in err
    assert [info.step for info in Checkpointer(run, read_only=True).list()] == [1, 2, 3]


def _deep(depth: int) -> dict:
    value: dict = {"w": torch.ones(1)}
    for _ in range(depth):
        value = {"a": value}
    return value


FILES_THAT_CANNOT_BE_IMPORTED = {
    # what the file holds -> (how it is written, what the one line says)
    "a pickle named .safetensors": (
        lambda p: p.write_bytes(pickle.dumps([1])),
        "cannot read {file} as a torch.save file",
    ),
    "a state nested 200 deep": (
        lambda p: torch.save({"model": _deep(200)}, p),
        "containers nest deeper than 60 levels",
    ),
    "a global_step of 2**64": (
        lambda p: torch.save({"model": {"w": torch.ones(1)}, "global_step": 2**64}, p),
        "the file's global_step is 18446744073709551616, not a step a checkpoint holds",
    ),
    "a negative step": (
        lambda p: torch.save({"model": {"w": torch.ones(1)}, "step": -5}, p),
        "the file's step is -5, not a step a checkpoint holds",
    ),
    "a step given as a string": (
        lambda p: torch.save({"model": {"w": torch.ones(1)}, "epoch": "7"}, p),
        "the file's epoch is '7', not a step a checkpoint holds",
    ),
    "no key that names an entry": (
        lambda p: torch.save({1: torch.ones(1), "__meta__": 2}, p),
        "none of the file's top-level keys names an entry (1, '__meta__')",
    ),
}


@pytest.mark.parametrize("held", FILES_THAT_CANNOT_BE_IMPORTED)
def test_a_file_that_cannot_be_imported_gives_one_line_and_commits_nothing(
    tmp_path: Path, capsys, held: str
):
    write, said = FILES_THAT_CANNOT_BE_IMPORTED[held]
    name = "fake.safetensors" if "safetensors" in held else "file.pt"
    write(tmp_path / name)
    code, out, err = run_cli(capsys, "import", str(tmp_path / name), "-o", str(tmp_path / "run"))
    assert (code, out) == (1, "")
    assert err.startswith("haltpoint: error: ") and err.count("\n") == 1
    assert said.format(file=tmp_path / name) in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("step-*"))


def test_a_step_a_checkpoint_cannot_hold_is_refused_and_given_one_the_file_step_is_ignored(
    tmp_path: Path, capsys
):
    torch.save({"model": {"w": torch.ones(1)}, "global_step": 2**64}, tmp_path / "file.pt")
    argv = ["import", str(tmp_path / "file.pt"), "-o", str(tmp_path / "run")]
    code, _, err = run_cli(capsys, *argv, "--step", str(2**63))
    assert code == 2 and "must be an int >= 0 and below 9223372036854775808" in err
    assert run_cli(capsys, *argv, "--step", str(2**63 - 1))[0] == 0
    with Checkpointer(tmp_path / "run", read_only=True) as reader:
        assert [info.step for info in reader.list()] == [2**63 - 1]
