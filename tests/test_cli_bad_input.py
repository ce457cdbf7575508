"""Every bad input the command can get: one line on stderr naming the flag, the documented exit
status (docs/cli.md), never a traceback; and Ctrl-C at any moment, imports included."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import haltpoint
from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.cli.app import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, build_parser

USAGE, FAILURE = EXIT_USAGE, EXIT_FAILURE


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A run with a history, and the other things a user may point a command at."""
    root = tmp_path_factory.mktemp("bad")
    with Checkpointer(root / "run", async_save=False, capture_rng=False) as ckpt:
        ckpt.save(5, {"model": {"w": torch.ones(3)}}, {"loss": 0.25})
    (root / "empty").mkdir()
    (root / "dir.safetensors").mkdir()
    (root / "dir.png").mkdir()
    (root / "file").write_text("not a folder")
    (root / "notes.txt").write_text("dear diary\nnot json either\n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    os.mkfifo(root / "fifo")
    torch.save({"w": torch.ones(2)}, root / "weights.pt")
    return {
        "run": str(root / "run"),
        "empty": str(root / "empty"),
        "file": str(root / "file"),
        "notes": str(root / "notes.txt"),
        "binary": str(root / "binary.bin"),
        "fifo": str(root / "fifo"),
        "weights": str(root / "weights.pt"),
        "dir_st": str(root / "dir.safetensors"),
        "dir_png": str(root / "dir.png"),
        "missing": str(root / "missing"),
        "tmp": str(root),
        "nothing": "",
        "long": "x" * 300,
    }


# (command line, exit status, a text the one line must hold: the flag, or what is wrong)
CASES = [
    # export: the output path, checked before any work
    ("export {run} -o {tmp}/no/such/m.safetensors", USAGE, "-o"),
    ("export {run} -o {file}/m.safetensors", USAGE, "-o"),
    ("export {run} -o {dir_st}", USAGE, "-o"),
    ("export {run} -o {tmp}/m.pt", USAGE, "-o"),
    ("export {run} -o {tmp}/.safetensors", USAGE, "-o"),  # `-o $NAME.safetensors`, no NAME
    ("export {run} -o {nothing}", USAGE, "-o"),
    ("export {run} -o {tmp}/{long}.safetensors", USAGE, "-o"),
    ("export {run} --which soon -o {tmp}/m.safetensors", USAGE, "--which"),
    ("export {run} --which -3 -o {tmp}/m.safetensors", USAGE, "--which"),
    ("export {run} --key nope -o {tmp}/m.safetensors", USAGE, "--key"),
    ("export {run} --monitor nope -o {tmp}/m.safetensors", USAGE, "--monitor"),
    ("export {run}", USAGE, "-o"),
    ("export {missing} -o {tmp}/m.safetensors", FAILURE, "does not exist"),
    ("export {run} --which 99 -o {tmp}/m.safetensors", FAILURE, "step 99"),
    # plot
    ("plot {run} -o {tmp}/no/such/curves.png", USAGE, "-o"),
    ("plot {run} -o {file}/curves.png", USAGE, "-o"),
    ("plot {run} -o {dir_png}", USAGE, "-o"),
    ("plot {run} -o {tmp}/curves.txt", USAGE, "-o"),
    ("plot {run} -o {tmp}/.png", USAGE, "-o"),  # matplotlib: no format (exit status 1 before)
    ("plot {run} -o {nothing}", USAGE, "-o"),
    ("plot {run} --metric nope", USAGE, "--metric"),
    ("plot {run} --monitor nope", USAGE, "--monitor"),
    ("plot {run} --mode sideways", USAGE, "--mode"),
    ("plot {empty}", FAILURE, "history.jsonl"),
    ("plot {file}", FAILURE, "is not a folder"),
    # demo: refused before anything is printed or trained
    ("demo --run-dir {file}", USAGE, "--run-dir"),
    ("demo --run-dir {file}/sub", USAGE, "--run-dir"),
    ("demo --run-dir {nothing}", USAGE, "--run-dir"),
    ("demo --run-dir {tmp}/{long}/run", USAGE, "--run-dir"),
    ("demo --seed -5", USAGE, "--seed"),
    ("demo --seed 4294967296", USAGE, "--seed"),
    ("demo --seed x", USAGE, "--seed"),
    ("demo --epochs 0", USAGE, "--epochs"),
    # gc: values are the CLI's flags, never the library's parameters
    ("gc {run} --keep-last 0", USAGE, "--keep-last"),
    ("gc {run} --keep-last -1", USAGE, "--keep-last"),
    ("gc {run} --keep-last 1.5", USAGE, "--keep-last"),
    ("gc {run} --keep-best -1", USAGE, "--keep-best"),
    ("gc {run} --keep-every 0", USAGE, "--keep-every"),
    ("gc {run}", USAGE, "--keep-last"),
    ("gc {run} --keep-best 0", USAGE, "--keep-best 0 keeps no checkpoint"),
    ("gc {run} --keep-best 1 --monitor nope", USAGE, "--monitor"),
    ("gc {empty} --keep-last 1", FAILURE, "holds no checkpoint"),
    ("gc {missing} --keep-last 1", FAILURE, "does not exist"),
    # show, ls, verify
    ("show {run} --step -1", USAGE, "--step"),
    ("show {run} --step x", USAGE, "--step"),
    ("show {run} --step 99", FAILURE, "step 99"),
    ("show {empty}", FAILURE, "no intact checkpoint"),
    ("ls {run} --monitor nope", USAGE, "--monitor"),
    ("ls {file}", FAILURE, "is not a folder"),
    ("ls {nothing}", USAGE, "DIR"),
    ("ls nosuchprotocol://run", FAILURE, "cannot open run directory nosuchprotocol://run"),
    ("verify {empty}", FAILURE, "no checkpoint"),
    ("verify {empty} --json", FAILURE, "no checkpoint"),
    ("verify {tmp}", FAILURE, "no checkpoint"),
    ("verify {file}", FAILURE, "is not a folder"),
    # replay
    ("replay {notes}", FAILURE, "is not a haltpoint history"),
    ("replay {binary}", FAILURE, "is not a haltpoint history"),
    ("replay {file}", FAILURE, "is not a haltpoint history"),
    ("replay {fifo}", FAILURE, "is not a regular file (a FIFO"),  # was "run directory ..."
    ("replay /dev/null", FAILURE, "is not a regular file"),
    ("replay {empty}", FAILURE, "history.jsonl"),
    ("replay {run} --metric nope", USAGE, "--metric"),
    ("replay {run} --patience x", USAGE, "--patience"),
    ("replay {run} --patience 3,-1", USAGE, "--patience"),
    ("replay {run} --min-delta nan", USAGE, "--min-delta"),
    ("replay {run} --min-delta -1", USAGE, "--min-delta"),
    ("replay {run} --horizon 0", USAGE, "--horizon"),
    # import
    ("import {weights} -o {file}", USAGE, "-o"),
    ("import {weights} -o {file}/run", USAGE, "-o"),
    ("import {weights} -o {nothing}", USAGE, "-o"),
    ("import {weights} -o {tmp}/imported --step -1", USAGE, "--step"),
    ("import {notes} -o {tmp}/imported", FAILURE, "cannot read"),
    ("import {missing} -o {tmp}/imported", FAILURE, "does not exist"),
    ("import {empty} -o {tmp}/imported", FAILURE, "is a folder, not a file; pass a torch.save"),
    ("import {fifo} -o {tmp}/imported", FAILURE, "is a FIFO, not a file; pass a torch.save"),
    # numbers are the ASCII digits 0-9 only: int() and float() also take other scripts'
    # digits (Arabic-Indic five is step 5 to int()), a sign and underscores
    ("show {run} --step \u0665", USAGE, "--step"),
    ("show {run} --step +5", USAGE, "--step"),
    ("show {run} --step 0_5", USAGE, "--step"),
    ("export {run} --which \u0665 -o {tmp}/m.safetensors", USAGE, "--which"),
    ("gc {run} --keep-last \u0661", USAGE, "--keep-last"),
    ("gc {run} --keep-last +1", USAGE, "--keep-last"),
    ("replay {run} --patience 1,\u0662", USAGE, "--patience"),
    ("replay {run} --patience +1", USAGE, "--patience"),
    ("replay {run} --horizon \u0661\u0660", USAGE, "--horizon"),
    ("replay {run} --min-delta \u0661", USAGE, "--min-delta"),
    ("replay {run} --min-delta 0_1", USAGE, "--min-delta"),
    # the parser itself
    ("frobnicate", USAGE, "frobnicate"),
    ("ls {run} --bogus", USAGE, "--bogus"),
    ("ls", USAGE, "DIR"),
]


@pytest.mark.parametrize(("line", "code", "named"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_and_the_documented_status(
    line: str, code: int, named: str, places: dict[str, str], capsys, monkeypatch
):
    monkeypatch.chdir(places["tmp"])  # demo's default run directory lands there, if at all
    argv = [part.format(**places) for part in line.split()]
    assert main(argv) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("haltpoint: error: ")
    assert named in captured.err
    assert captured.out == ""
    assert not os.path.exists(os.path.join(places["tmp"], "runs"))  # the demo trained nothing
    assert not os.path.exists(os.path.join(places["tmp"], "imported"))


def test_every_numeric_flag_is_checked_by_the_cli_naming_the_flag():
    """A bare `type=int` would pass -5 on to the library, whose error names a parameter."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    bare = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.type in (int, float)
    ]
    assert bare == []


def test_a_write_that_fails_midway_is_one_line_and_leaves_nothing(
    places: dict[str, str], tmp_path: Path, capsys, monkeypatch
):
    import safetensors
    import safetensors.torch

    def full_disk(tensors, path, metadata=None):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"half")
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    target = tmp_path / "m.safetensors"
    assert main(["export", places["run"], "-o", str(target)]) == FAILURE
    assert capsys.readouterr().err == (
        f"haltpoint: error: cannot write -o {target}: No space left on device\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_output_inside_a_checkpoint_folder_is_refused(tmp_path: Path, capsys):
    run = tmp_path / "run"
    with Checkpointer(run, keep_last=2, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(1, {"model": {"w": torch.ones(3)}}, {"loss": 0.5})
        ckpt.save(2, {"model": {"w": torch.zeros(3)}}, {"loss": 0.25})
    data = run / "step-000000001" / "tensors.safetensors"
    before = data.read_bytes()
    (tmp_path / "link").symlink_to(run / "step-000000001")
    for target in (data, tmp_path / "link" / "tensors.safetensors"):
        argv = ["export", str(run), "--which", "2", "-o", str(target)]
        assert main(argv) == USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is inside the checkpoint folder" in err
    argv = ["plot", str(run), "-o", str(run / "step-000000002" / "curves.png")]
    assert main(argv) == USAGE
    assert "is inside the checkpoint folder" in capsys.readouterr().err
    for argv in (
        ["import", str(weights_file(tmp_path)), "-o", str(run / "step-000000001")],
        ["demo", "--run-dir", str(tmp_path / "link" / "nested"), "--epochs", "1"],
    ):
        assert main(argv) == USAGE
        assert "is inside a checkpoint's step-* folder" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "step-000000001").iterdir()) == [
        "manifest.json",
        "tensors.safetensors",
    ]
    assert data.read_bytes() == before
    assert main(["verify", str(run)]) == 0


@pytest.mark.parametrize("command", ["ls", "show", "verify", "plot", "replay", "gc", "export"])
def test_a_checkpoint_folder_given_as_the_run_is_one_line_naming_the_run(
    command: str, tmp_path: Path, capsys, monkeypatch
):
    """The path `ls --json` and `show` print for a checkpoint is its step folder; given as DIR
    it was read as a run holding nothing (`ls`: `no checkpoints in ...`, status 0; `show`:
    `no intact checkpoint`): now one line says it is a checkpoint's folder and names the run."""
    run = tmp_path / "run"
    with Checkpointer(run, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(3, {"model": {"w": torch.ones(3)}}, {"loss": 0.5})
    extra = {"gc": ["--keep-last", "1"], "export": ["-o", str(tmp_path / "m.safetensors")]}
    monkeypatch.chdir(run / "step-000000003")
    for folder in (str(run / "step-000000003"), str(run / "step-000000003") + "/", "."):
        assert main([command, folder, *extra.get(command, [])]) == FAILURE
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "is the folder of one checkpoint (step 3), not a run directory" in err
        assert f"that holds it, {run} (" in err
    assert sorted(p.name for p in (run / "step-000000003").iterdir()) == [
        "manifest.json",
        "tensors.safetensors",
    ]
    assert not (tmp_path / "m.safetensors").exists()


def weights_file(folder: Path) -> Path:
    torch.save({"w": torch.ones(2)}, folder / "weights.pt")
    return folder / "weights.pt"


def test_an_unwritable_folder_is_refused_before_any_work(
    places: dict[str, str], tmp_path: Path, capsys, monkeypatch
):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    real = os.access  # root may write anywhere: there, access() is told the folder is locked

    def access(path, mode, **kwargs):  # type: ignore[no-untyped-def]
        return not str(path).startswith(str(locked)) and real(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    try:
        for argv in (
            ["export", places["run"], "-o", str(locked / "m.safetensors")],
            ["plot", places["run"], "-o", str(locked / "c.png")],
            ["demo", "--run-dir", str(locked / "run")],
        ):
            assert main(argv) == USAGE
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is not writable" in err
    finally:
        locked.chmod(0o700)


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(
    tmp_path: Path, capsys, monkeypatch
):
    import haltpoint.cli.demo

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(haltpoint.cli.demo, "train_demo", interrupted)
    run = tmp_path / "never"
    assert main(["demo", "--run-dir", str(run)]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "haltpoint: interrupted before the first checkpoint; nothing saved; start again with: "
        f"haltpoint demo --run-dir {run}"
    )


def test_ctrl_c_in_a_read_only_command_says_nothing_changed(
    places: dict[str, str], capsys, monkeypatch
):
    import haltpoint.cli.verify

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(haltpoint.cli.verify, "verify_run", interrupted)
    assert main(["verify", places["run"]]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "haltpoint: interrupted; nothing was changed\n"


def test_ctrl_c_during_an_export_leaves_no_half_written_file(
    places: dict[str, str], tmp_path: Path, capsys, monkeypatch
):
    import safetensors.torch

    def interrupted(tensors, path, metadata=None):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    target = tmp_path / "m.safetensors"
    assert main(["export", places["run"], "-o", str(target)]) == EXIT_INTERRUPTED
    assert "never half-written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_importing_haltpoint_imports_no_torch_and_every_name_resolves():
    code = "import sys, haltpoint; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "False\n"
    for name in haltpoint.__all__:
        assert getattr(haltpoint, name) is not None
    assert set(haltpoint.__all__) <= set(dir(haltpoint))


def test_type_checkers_see_every_public_name_and_refuse_a_misspelt_one(tmp_path: Path):
    """The lazy root's names are typed (its TYPE_CHECKING imports), and a name it lacks is an
    error for mypy rather than `Any` (no module `__getattr__` under type checking)."""
    user = tmp_path / "user.py"
    lines = ["import haltpoint"] + [f"haltpoint.{name}" for name in haltpoint.__all__]
    user.write_text("\n".join([*lines, "haltpoint.Checkpointerr", ""]))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent", str(user)],
        capture_output=True, text=True,
    )  # fmt: skip
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and 'no attribute "Checkpointerr"' in errors[0], done.stdout


@pytest.mark.parametrize("package", ["torch", "numpy"])
def test_ctrl_c_during_the_imports_is_one_line_and_130(places: dict[str, str], package: str):
    """SIGINT while torch, or NumPy, is being imported (told by -X importtime's lines as they
    come). torch imports NumPy from C, where a KeyboardInterrupt is dropped, and the command
    ran on with a half-imported NumPy (tracebacks, or no stop): the CLI imports NumPy first."""
    child = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "haltpoint", "ls", places["run"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert child.stderr is not None
    for line in child.stderr:
        if f" {package}." in line:  # a submodule done: the package itself is still importing
            child.send_signal(signal.SIGINT)
            break
    out, err = child.communicate(timeout=120)
    lines = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert child.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert lines == ["haltpoint: interrupted; nothing was done"]
    assert out == ""


COMMAND_LINES = {
    "demo": "demo --run-dir {tmp}/never",
    "listing": "ls {run}",
    "show": "show {run}",
    "verify": "verify {run}",
    "export": "export {run} -o {tmp}/m.safetensors",
    "gc": "gc {run} --keep-last 1",
    "plot": "plot {run}",
    "replay": "replay {run}",
    "importer": "import {weights} -o {tmp}/never-imported",
}


@pytest.mark.parametrize("module", sorted(COMMAND_LINES))
def test_ctrl_c_in_any_command_is_one_line_saying_what_was_kept(
    module: str, places: dict[str, str], capsys, monkeypatch
):
    import importlib

    def interrupted(args, out):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"haltpoint.cli.{module}"), "run", interrupted)
    argv = [part.format(**places) for part in COMMAND_LINES[module].split()]
    assert main(argv) == EXIT_INTERRUPTED
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("haltpoint: interrupted")
    assert captured.out == ""


def test_an_os_error_in_any_command_is_one_line_without_errno(
    places: dict[str, str], capsys, monkeypatch
):
    import haltpoint.cli.listing

    def denied(args, out):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied", "/srv/run/step-000000001")

    monkeypatch.setattr(haltpoint.cli.listing, "run", denied)
    assert main(["ls", places["run"]]) == FAILURE
    assert capsys.readouterr().err == (
        "haltpoint: error: /srv/run/step-000000001: Permission denied\n"
    )


@pytest.mark.parametrize("raised", [RecursionError("too deep"), KeyError("x"), MemoryError()])
def test_an_unexpected_exception_is_still_one_line_naming_it(
    raised: Exception, tmp_path: Path, capsys, monkeypatch
):
    """Whatever a run directory or a file makes a command raise, the user gets one line."""
    import haltpoint.cli.listing

    def fail(*args: object) -> int:
        raise raised

    monkeypatch.setattr(haltpoint.cli.listing, "run", fail)
    assert main(["ls", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"haltpoint: error: unexpected {type(raised).__name__}"
    )
    assert "a bug in haltpoint" in err


@pytest.mark.parametrize("package", ["botocore.exceptions", "google.auth.exceptions"])
def test_a_storage_back_end_error_is_one_line_that_blames_the_storage(
    package: str, tmp_path: Path, capsys, monkeypatch
):
    """s3fs passes botocore's own exceptions (no credentials, no endpoint) through as they
    are: not OSErrors, not haltpoint's bugs."""
    import haltpoint.cli.listing

    error = type("NoCredentialsError", (Exception,), {"__module__": package})

    def fail(*args: object) -> int:
        raise error("Unable to locate credentials")

    monkeypatch.setattr(haltpoint.cli.listing, "run", fail)
    assert main(["ls", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"haltpoint: error: {package.partition('.')[0]} error NoCredentialsError: Unable to "
        "locate credentials (from the storage, not haltpoint: check the URL, the credentials, "
        "the endpoint and the network)\n"
    )


@pytest.mark.parametrize("ctrl_c", [True, False])
def test_a_ctrl_c_that_an_import_turns_into_an_import_error_is_still_an_interruption(
    ctrl_c: bool, monkeypatch, capsys
):
    """NumPy's C import can turn a KeyboardInterrupt into "PyCapsule_Import could not import
    module datetime" (seen once in CI); an ImportError with no Ctrl-C is a real one."""
    import builtins
    import time

    real_import = builtins.__import__

    def importing(name: str, *args: object, **kwargs: object) -> object:
        if name == "numpy":
            try:
                if ctrl_c:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)  # the handler raises here
            except KeyboardInterrupt:
                pass
            raise ImportError('PyCapsule_Import could not import module "datetime"')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", importing)
    if ctrl_c:
        assert main(["--version"]) == EXIT_INTERRUPTED
        assert capsys.readouterr().err == "haltpoint: interrupted; nothing was done\n"
    else:
        with pytest.raises(ImportError, match="PyCapsule_Import"):
            main(["--version"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
