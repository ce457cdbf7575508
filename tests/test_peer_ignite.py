"""ignite's own early-stopping tests (tests/ignite/handlers/test_early_stopping.py), ported.

Also `test_add_early_stopping_by_val_score` of tests/ignite/contrib/engines/test_common.py.

ignite's handler maximizes a score returned by a `score_function` and terminates its trainer;
here each score is one `EarlyStopping.step()` with `mode="max"`, and an engine run is a loop
over epochs that breaks when the stopper says so. Where haltpoint differs by design
(docs/stopping.md, "Point by point"), the case asserts haltpoint's behaviour and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from haltpoint import EarlyStopping

sys.path.insert(0, str(Path(__file__).parent))
from ports import free_port
from torchrun import rank_results, torchrun


def decisions(stopper: EarlyStopping, scores: list[float]) -> list[bool]:
    return [bool(stopper.step(score)) for score in scores]


def epochs_run(stopper: EarlyStopping, scores: list[Any], max_epochs: int) -> int:
    """A trainer's loop: evaluate after every epoch, stop when the stopper says so."""
    for epoch, score in enumerate(scores[:max_epochs], start=1):
        if stopper.step(score):
            return epoch
    return min(len(scores), max_epochs)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"patience": -1}, ValueError),
        ({"patience": 2, "min_delta": -0.1}, ValueError),
        ({"monitor": 12345, "patience": 2}, TypeError),
    ],
)
def test_args_validation(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """Ports test_args_validation (negative patience, negative min_delta, a bad score source)."""
    with pytest.raises(error):
        EarlyStopping(mode="max", **kwargs)


def test_simple_early_stopping() -> None:
    """Ports test_simple_early_stopping: [1.0, 0.8, 0.88], patience 2, stops at the third."""
    assert decisions(EarlyStopping(mode="max", patience=2), [1.0, 0.8, 0.88]) == [
        False,
        False,
        True,
    ]


def test_state_dict() -> None:
    """Ports test_state_dict: a new stopper loaded with the state continues where it was."""
    first = EarlyStopping(mode="max", patience=2)
    assert not first.step(1.0)
    second = EarlyStopping(mode="max", patience=2)
    second.load_state_dict(first.state_dict())
    assert decisions(second, [0.8, 0.88]) == [False, True]


def test_early_stopping_on_delta() -> None:
    """Ports test_early_stopping_on_delta: min_delta=0.1, stops at the sixth score."""
    scores = [1.0, 2.0, 2.01, 3.0, 3.01, 3.02]
    stopper = EarlyStopping(mode="max", patience=2, min_delta=0.1)
    assert decisions(stopper, scores) == [False] * 5 + [True]


def test_early_stopping_on_last_event_delta() -> None:
    """Ports test_early_stopping_on_last_event_delta; differs by design (cumulative delta).

    ignite's default `cumulative_delta=False` moves the best on every sub-threshold gain, so
    0.0, 0.3, 0.6 with min_delta=0.4 stops at the third. haltpoint's best moves only on an
    improvement (docs/stopping.md, "improvement"): 0.6 beats 0.0 by 0.6, so it does not stop.
    """
    stopper = EarlyStopping(mode="max", patience=2, min_delta=0.4)
    assert decisions(stopper, [0.0, 0.3, 0.6]) == [False, False, False]
    assert stopper.best == 0.6


def test_early_stopping_on_cumulative_delta() -> None:
    """Ports test_early_stopping_on_cumulative_delta: 0.0, 0.3, 0.6 with min_delta=0.4 runs on."""
    stopper = EarlyStopping(mode="max", patience=2, min_delta=0.4)
    assert decisions(stopper, [0.0, 0.3, 0.6]) == [False, False, False]
    assert stopper.wait == 0


def test_simple_early_stopping_on_plateau() -> None:
    """Ports test_simple_early_stopping_on_plateau: a constant score, patience 1, stops at 2."""
    assert decisions(EarlyStopping(mode="max", patience=1), [42.0, 42.0]) == [False, True]


def test_simple_no_early_stopping() -> None:
    """Ports test_simple_no_early_stopping: [1.0, 0.8, 1.2], patience 2, never stops."""
    assert decisions(EarlyStopping(mode="max", patience=2), [1.0, 0.8, 1.2]) == [False] * 3


def test_with_engine_early_stopping() -> None:
    """Ports test_with_engine_early_stopping: patience 3 over ten epochs stops after 7."""
    scores = [1.0, 0.8, 1.2, 1.5, 0.9, 1.0, 0.99, 1.1, 0.9]
    assert epochs_run(EarlyStopping(mode="max", patience=3), scores, 10) == 7


def test_with_engine_early_stopping_on_plateau() -> None:
    """Ports test_with_engine_early_stopping_on_plateau: a constant score, patience 4, 5 epochs."""
    assert epochs_run(EarlyStopping(mode="max", patience=4), [0.047] * 10, 10) == 5


def test_with_engine_no_early_stopping() -> None:
    """Ports test_with_engine_no_early_stopping: patience 5 runs all ten epochs."""
    scores = [1.0, 0.8, 1.2, 1.23, 0.9, 1.0, 1.1, 1.253, 1.26, 1.2]
    stopper = EarlyStopping(mode="max", patience=5)
    assert epochs_run(stopper, scores, 10) == 10
    assert not stopper.stopped


VAL_ACC = [0.1, 0.2, 0.3, 0.4, 0.3, 0.3, 0.2, 0.1, 0.1, 0.0]


@pytest.mark.parametrize(
    ("mode", "score"),
    [("max", lambda acc: acc), ("min", lambda acc: 1 - acc)],
    ids=["acc", "loss_score_sign_-1"],
)
def test_add_early_stopping_by_val_score(mode: str, score: Any) -> None:
    """Ports contrib/engines/test_common.py test_add_early_stopping_by_val_score: epoch 7.

    ignite's helper watches an evaluator metric, `score_sign=-1.0` for a loss; here the
    direction is `mode`. Best at epoch 4, so patience 3 ends the run after epoch 7.
    """
    stopper = EarlyStopping("val", mode=mode, patience=3)
    scores = [{"val": score(acc)} for acc in VAL_ACC]
    assert epochs_run(stopper, scores, len(VAL_ACC)) == 7


WORKER = Path(__file__).parent / "workers" / "peer_ignite_worker.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One torchrun launch (2 ranks, gloo on CPU) of both distributed scenarios."""
    out = tmp_path_factory.mktemp("ignite_ddp")
    torchrun(WORKER, "--out", str(out))
    return rank_results(out)


@pytest.mark.slow
def test_distrib_with_engine_early_stopping(two_ranks: list[dict[str, Any]]) -> None:
    """Ports _test_distrib_with_engine_early_stopping (distrib_cpu): the mean stops at epoch 7."""
    assert [r["scores"]["epoch"] for r in two_ranks] == [7, 7]
    assert two_ranks[0]["scores"] == two_ranks[1]["scores"]


@pytest.mark.slow
def test_distrib_integration_engine_early_stopping(two_ranks: list[dict[str, Any]]) -> None:
    """Ports _test_distrib_integration_engine_early_stopping (distrib_cpu): accuracy, epoch 5."""
    assert [r["accuracy"]["epoch"] for r in two_ranks] == [5, 5]
    assert two_ranks[0]["accuracy"] == two_ranks[1]["accuracy"]
    assert two_ranks[0]["accuracy"]["best"] == 1.0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Two torchrun node processes (2 ranks each, gloo on CPU, a rendezvous on 127.0.0.1)."""
    out = tmp_path_factory.mktemp("ignite_multinode")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(node: int) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
            f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
            str(WORKER), "--out", str(out),
        ]  # fmt: skip

    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    nodes = [subprocess.Popen(command(node), env=env, **pipes) for node in (0, 1)]
    logs = []
    for proc in nodes:
        try:
            logs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
    assert [proc.returncode for proc in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.slow
def test_multinode_distrib_with_engine_early_stopping(two_nodes: list[dict[str, Any]]) -> None:
    """Ports _test_distrib_with_engine_early_stopping (multinode gloo CPU): all 4 stop at 7."""
    assert [r["scores"]["epoch"] for r in two_nodes] == [7] * 4
    assert all(r["scores"] == two_nodes[0]["scores"] for r in two_nodes)


@pytest.mark.slow
def test_multinode_distrib_integration_engine_early_stopping(
    two_nodes: list[dict[str, Any]],
) -> None:
    """Ports _test_distrib_integration_engine_early_stopping (multinode gloo CPU): epoch 5."""
    assert [r["accuracy"]["epoch"] for r in two_nodes] == [5] * 4
    assert all(r["accuracy"] == two_nodes[0]["accuracy"] for r in two_nodes)
    assert two_nodes[0]["accuracy"]["best"] == 1.0
