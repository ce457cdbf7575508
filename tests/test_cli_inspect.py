"""`haltpoint ls`, `show` and `verify`: read-only views of a run, damage found and named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.stopping import EarlyStopping
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage

VALUES = (0.5, 0.3, 0.4, 0.35)


def make_run(path: Path, values: tuple[float, ...] = VALUES) -> torch.nn.Module:
    """A run with one checkpoint per value (val_loss), a stopper in the state, all kept."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    stopper = EarlyStopping("val_loss", patience=2)
    with Checkpointer(
        path, monitor="val_loss", keep_last=10, async_save=False, capture_rng=False
    ) as ckpt:
        for step, value in enumerate(values):
            with torch.no_grad():
                model.weight.add_(1.0)
            metrics = {"val_loss": value, "val_acc": 1 - value}
            stopper.step(metrics)
            ckpt.save(step, {"model": model, "stopper": stopper}, metrics)
    return model


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "\x1b[" not in captured.out + captured.err  # plain text when not a terminal
    return code, captured.out, captured.err


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    make_run(tmp_path / "run")
    return tmp_path / "run"


# -- ls ---------------------------------------------------------------------------------------


def test_ls_table_has_steps_metrics_and_tags(run_dir: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _ = run_cli(capsys, "ls", str(run_dir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["step", "time", "metrics", "size", "shared", "tags", "status"]
    rows = {int(line.split()[0]): line for line in lines[1:]}
    assert sorted(rows) == [0, 1, 2, 3]
    assert "val_loss=0.3" in rows[1] and " best " in rows[1]  # lowest val_loss, found via stopper
    assert "latest" in rows[3] and all("committed" in row for row in rows.values())


def test_ls_json_parses_with_step_and_metrics(run_dir: Path, capsys):
    code, out, _ = run_cli(capsys, "ls", str(run_dir), "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["metrics"] == {"val_acc": pytest.approx(0.6), "val_loss": 0.4}
    assert rows[1]["tags"] == ["best"] and rows[3]["tags"] == ["latest"]
    assert all(r["status"] == "committed" and r["size"] == 4 * (6 + 2) for r in rows)
    assert all(r["shared"] == 0 for r in rows)  # one tensor file per checkpoint
    assert [r["sequence"] for r in rows] == [0, 1, 2, 3]  # the commit order


def test_ls_monitor_option_changes_best(run_dir: Path, capsys):
    _, out, _ = run_cli(capsys, "ls", str(run_dir), "--json", "--monitor", "val_acc")
    assert [r["tags"] for r in json.loads(out)][1] == ["best"]  # val_acc infers max: 0.7
    code, _, err = run_cli(capsys, "ls", str(run_dir), "--monitor", "nope")
    assert code == 2
    assert err.startswith("haltpoint: error: --monitor 'nope' is not a metric")
    assert "val_acc, val_loss" in err or "val_loss, val_acc" in err


def test_ls_shows_damaged_manifest_and_uncommitted_folder(run_dir: Path, capsys):
    manifest = run_dir / "step-000000002" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"step":2', b'"step":7'))
    (run_dir / "step-000000009").mkdir()
    code, out, err = run_cli(capsys, "ls", str(run_dir))
    assert code == 0
    rows = {int(line.split()[0]): line for line in out.splitlines()[1:]}
    assert rows[2].rstrip().endswith("damaged")
    assert rows[9].rstrip().endswith("uncommitted")
    assert "step 2 is damaged" in err and "checksum" in err
    _, out, _ = run_cli(capsys, "ls", str(run_dir), "--json")
    by_step = {r["step"]: r for r in json.loads(out)}
    assert by_step[2]["status"] == "damaged" and by_step[2]["error"]


def test_ls_is_read_only_while_a_writer_holds_the_lock(run_dir: Path, capsys):
    with Checkpointer(run_dir, keep_last=10):
        code, out, _ = run_cli(capsys, "ls", str(run_dir), "--json")
    assert code == 0 and len(json.loads(out)) == 4


def test_ls_missing_directory_is_one_line_and_not_created(tmp_path: Path, capsys):
    missing = tmp_path / "nowhere"
    code, out, err = run_cli(capsys, "ls", str(missing))
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"haltpoint: error: run directory {missing} does not exist; pass")
    assert not missing.exists()


def test_ls_empty_directory(tmp_path: Path, capsys):
    code, out, err = run_cli(capsys, "ls", str(tmp_path))
    assert code == 0 and out == "" and "no checkpoints in" in err
    _, out, _ = run_cli(capsys, "ls", str(tmp_path), "--json")
    assert json.loads(out) == []


# -- show -------------------------------------------------------------------------------------


def test_show_latest_tree_and_metadata(run_dir: Path, capsys):
    code, out, _ = run_cli(capsys, "show", str(run_dir))
    assert code == 0
    assert out.startswith("step:      3\n")
    assert "metrics:   val_acc=0.65 val_loss=0.35" in out
    assert "torch " in out and "haltpoint 0.1.0" in out
    assert "model: stateful torch.nn.modules.linear.Linear, 2 tensors, 32 B" in out
    assert "weight: float32 [2, 3]  24 B" in out
    assert "bias: float32 [2]  8 B" in out
    assert "stopper: stateful haltpoint.stopping.early_stopping.EarlyStopping" in out
    assert "evaluations: 4" in out


def test_show_step_and_json(run_dir: Path, capsys):
    code, out, _ = run_cli(capsys, "show", str(run_dir), "--step", "1", "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["step"] == 1 and shown["metrics"]["val_loss"] == 0.3
    assert shown["tensors"]["model.weight"]["shape"] == [2, 3]
    assert set(shown["tree"]) == {"model", "stopper"}


def test_show_missing_step_lists_available(run_dir: Path, capsys):
    code, _, err = run_cli(capsys, "show", str(run_dir), "--step", "42")
    assert code == 1
    assert "no intact checkpoint for step 42" in err and "available: 0, 1, 2, 3" in err


# -- verify -----------------------------------------------------------------------------------


def test_verify_intact_run(run_dir: Path, capsys):
    code, out, _ = run_cli(capsys, "verify", str(run_dir))
    assert code == 0
    assert "all 4 checkpoints are intact" in out


def test_verify_flipped_byte_fails_naming_the_file(run_dir: Path, capsys):
    damaged = run_dir / "step-000000001" / "tensors.safetensors"
    flip_last_byte(damaged)
    code, out, err = run_cli(capsys, "verify", str(run_dir))
    assert code == 1
    assert "1 of 4 checkpoints damaged:" in out
    assert "step 1: step-000000001/tensors.safetensors: bytes " in out
    assert "restore() never loads a damaged checkpoint, nor `haltpoint export` a damaged" in err
    code, out, _ = run_cli(capsys, "verify", str(run_dir), "--json")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False
    bad = [c for c in result["checkpoints"] if c["status"] == "damaged"]
    assert [c["step"] for c in bad] == [1]
    assert list(bad[0]["damaged"]) == ["step-000000001/tensors.safetensors"]


def test_verify_missing_file_and_damaged_manifest(run_dir: Path, capsys):
    os.remove(run_dir / "step-000000000" / "tensors.safetensors")
    (run_dir / "step-000000003" / "manifest.json").write_text("{not json")
    code, out, _ = run_cli(capsys, "verify", str(run_dir))
    assert code == 1
    assert "2 of 4 checkpoints damaged:" in out
    assert "step 0: step-000000000/tensors.safetensors" in out
    assert "step 3: " in out and "manifest" in out


def test_ls_shared_bytes_come_from_files_several_manifests_reference(tmp_path: Path, capsys):
    frozen = torch.zeros(1 << 19)  # 2 MiB, unchanged: dedup may reference it, not rewrite it
    with Checkpointer(tmp_path, keep_last=3, async_save=False, capture_rng=False) as ckpt:
        for step in range(3):
            ckpt.save(step, {"frozen": frozen, "live": torch.full((4,), float(step))})
    manifests = {e.step: e.manifest for e in RunDirectory(LocalStorage(tmp_path)).scan()}
    uses: dict[str, int] = {}
    for manifest in manifests.values():
        for file in manifest.files():
            uses[file] = uses.get(file, 0) + 1
    expected = {
        step: sum(r.nbytes for r in m.tensors.values() if uses[r.file] > 1)
        for step, m in manifests.items()
    }
    _, out, _ = run_cli(capsys, "ls", str(tmp_path), "--json")
    assert {r["step"]: r["shared"] for r in json.loads(out)} == expected


def test_verify_shows_a_progress_bar_only_on_a_terminal(run_dir: Path, monkeypatch):
    import argparse
    import io

    from haltpoint.cli import verify
    from haltpoint.cli.output import Output

    monkeypatch.setattr(verify, "_PROGRESS_CHECKPOINTS", 2)  # a "big" run
    args = argparse.Namespace(directory=str(run_dir), json=False)
    piped = Output(stdout=io.StringIO(), stderr=io.StringIO())
    assert verify.run(args, piped) == 0
    assert piped.stderr.getvalue() == ""  # type: ignore[attr-defined]
    terminal = Output(stdout=io.StringIO(), stderr=io.StringIO(), terminal=True)
    assert verify.run(args, terminal) == 0
    assert "verifying" in terminal.stderr.getvalue()  # type: ignore[attr-defined]
    assert "all 4 checkpoints are intact" in terminal.stdout.getvalue()  # type: ignore[attr-defined]


def test_a_removed_checkpoint_kept_for_its_data_is_data_only(tmp_path: Path, capsys):
    frozen = torch.zeros(1 << 19)  # 2 MiB, unchanged: later saves may reference its file
    with Checkpointer(tmp_path, keep_last=1, async_save=False, capture_rng=False) as ckpt:
        for step in range(3):
            ckpt.save(step, {"frozen": frozen, "live": torch.full((4,), float(step))})
    latest = RunDirectory(LocalStorage(tmp_path)).scan()[-1].manifest
    used = {file.split("/")[0] for file in latest.files()}
    _, out, _ = run_cli(capsys, "ls", str(tmp_path), "--json")
    statuses = {r["step"]: r["status"] for r in json.loads(out)}
    assert statuses[2] == "committed"
    for step, status in statuses.items():
        if step != 2:  # removed by retention: a folder remains only for referenced data
            assert status == "data-only" and f"step-{step:09d}" in used
    code, out, _ = run_cli(capsys, "ls", str(tmp_path))
    assert code == 0 and out.splitlines()[-1].split()[-2:] == ["latest", "committed"]
    code, out, _ = run_cli(capsys, "verify", str(tmp_path))
    assert code == 0 and "the checkpoint is intact (2.0 MiB" in out


def _flip_tensor_byte(folder: Path) -> None:
    flip_last_byte(folder / "tensors.safetensors")


def _remove_tensor_file(folder: Path) -> None:
    (folder / "tensors.safetensors").unlink()


def _truncate_tensor_file(folder: Path) -> None:
    path = folder / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:-10])


def _folder_at_tensor_file(folder: Path) -> None:
    (folder / "tensors.safetensors").unlink()
    (folder / "tensors.safetensors").mkdir()


def _header_without_a_tensor(folder: Path) -> None:
    path = folder / "tensors.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name[:-1] + ("y" if name.endswith("x") else "x")] = header.pop(name)  # same length
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(data[:8] + text.ljust(n) + data[8 + n :])


def _manifest_not_json(folder: Path) -> None:
    (folder / "manifest.json").write_text('{"not json')


DAMAGE = [  # (what is done to step 1, what verify says the cause is)
    (_flip_tensor_byte, r"tensors\.safetensors: bytes \d+-\d+ do not match the tensor's hash \("),
    (_remove_tensor_file, r"tensors\.safetensors: the file is missing \("),
    (_truncate_tensor_file, r"tensors\.safetensors: the tensors end at byte \d+ but the file has"),
    (_folder_at_tensor_file, r"tensors\.safetensors: .* is a folder, not a regular file"),
    (_header_without_a_tensor, r"tensors\.safetensors: the file's header has no tensor '"),
    (_manifest_not_json, r"manifest\.json: not valid strict JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "cause"), DAMAGE, ids=[d.__name__[1:] for d, _ in DAMAGE])
def test_verify_says_what_is_wrong_with_a_damaged_checkpoint(
    run_dir: Path, capsys: pytest.CaptureFixture[str], damage: object, cause: str
) -> None:
    """One line per damaged file, with the cause restore would give: which file, which
    tensors and bytes, a hash mismatch or a missing file or bad JSON."""
    import re

    damage(run_dir / "step-000000001")  # type: ignore[operator]
    code, out, _ = run_cli(capsys, "verify", str(run_dir))
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith("  step 1: ")]
    assert len(lines) == 1 and re.search(cause, lines[0]), out
    code, out, _ = run_cli(capsys, "verify", str(run_dir), "--json")
    check = next(c for c in json.loads(out)["checkpoints"] if c["step"] == 1)
    assert check["status"] == "damaged"
    said = [check["error"]] if check["error"] else []
    said += [
        f"{file}: {check['causes'][k]} (" for file, keys in check["damaged"].items() for k in keys
    ]
    assert any(re.search(cause, s) for s in said), check
