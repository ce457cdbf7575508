"""Sharded state across nodes: `torchrun --nnodes=2 --nproc_per_node=2` as two node processes
on this machine (different `--node_rank`, a rendezvous on 127.0.0.1), gloo on CPU.

tests/workers/multinode_worker.py trains an FSDP2 model on 4 ranks and saves it to a local
directory and to S3 (moto's server on loopback); node 1 is then killed with SIGKILL in the
middle of a save. Later jobs restore onto 1, 2 and 4 ranks. This process only starts the
jobs, kills the node and reads what the ranks wrote; a hang fails a job after its timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from haltpoint import Checkpointer

sys.path.insert(0, str(Path(__file__).parent))
from ports import free_port
from s3_server import moto_s3

WORKER = Path(__file__).parent / "workers" / "multinode_worker.py"
TIMEOUT_S = 240
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="torch.distributed with gloo is not available",
    ),
]


class Job:
    """One torchrun job: `nnodes` node processes of `nproc` ranks each, on loopback."""

    def __init__(self, nnodes: int, nproc: int, mode: str, dirs: list[str], out: Path, env: dict):
        port = free_port()
        args = [f"--run-dir={d}" for d in dirs]
        self.logs = [out / f"{mode}-{nnodes}x{nproc}-node{node}.log" for node in range(nnodes)]
        self.nodes = [
            subprocess.Popen(
                [
                    sys.executable, "-m", "torch.distributed.run",
                    f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", f"--node_rank={node}",
                    "--master_addr=127.0.0.1", f"--master_port={port}",
                    str(WORKER), f"--mode={mode}", f"--out={out}", *args,
                ],
                env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                stdout=self.logs[node].open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a node's processes form one group, killed together
            )
            for node in range(nnodes)
        ]  # fmt: skip

    def wait(self) -> list[int]:
        """Each node's exit status; a node that outlives the timeout fails the test."""
        codes = []
        for node in self.nodes:
            try:
                node.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"a node ran past {TIMEOUT_S} s (a hang?)\n{self.output()}")
            codes.append(node.returncode)
        return codes

    def output(self) -> str:
        return "\n".join(log.read_text()[-3000:] for log in self.logs)

    def kill(self, node: int | None = None) -> None:
        for proc in self.nodes if node is None else [self.nodes[node]]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def _wait_for(files: list[Path], job: Job, what: str, node: int | None = None) -> None:
    """Until every one of `files` is written; fails if the job (or that node of it) ends or
    the timeout passes first."""
    deadline = time.monotonic() + TIMEOUT_S
    watched = job.nodes if node is None else [job.nodes[node]]
    while not all(p.exists() and p.read_text() for p in files):
        if any(proc.poll() is not None for proc in watched) or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"{what}:\n{job.output()}")
        time.sleep(0.1)


def _kill_node_1_mid_save(job: Job, out: Path) -> float:
    """Wait until both ranks of node 1 are inside the write of their shards, then kill -9
    every process of that node; returns when it was killed."""
    pids = [out / "dying-2.pid", out / "dying-3.pid"]
    _wait_for(pids, job, "node 1 never reached the save of step 2")
    job.kill(1)  # the agent's process group
    for p in pids:  # the ranks run in sessions of their own (torchrun starts them so)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(p.read_text()), signal.SIGKILL)
    return time.time()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("multinode")
    out = root / "out"
    out.mkdir()
    with moto_s3() as s3:
        dirs = [str(root / "run"), s3.url(f"multinode-{uuid.uuid4().hex[:8]}")]
        train = Job(2, 2, "train", dirs, out, s3.env)
        killed_at = _kill_node_1_mid_save(train, out)
        survivors = [out / f"train4-rank{r}.json" for r in (0, 1)]
        _wait_for(survivors, train, "the ranks of node 0 did not report", node=0)
        train.kill()  # torchrun's agent would wait for the dead node at its exit barrier
        yield {
            "dirs": dirs,
            "out": out,
            "s3": s3,
            "killed_at": killed_at,
            "survivors": [json.loads(p.read_text()) for p in survivors],
        }


def _restore(cluster: dict[str, Any], nnodes: int, nproc: int) -> list[dict[str, Any]]:
    job = Job(nnodes, nproc, "restore", cluster["dirs"], cluster["out"], cluster["s3"].env)
    codes = job.wait()
    assert codes == [0] * nnodes, job.output()
    world = nnodes * nproc
    return [
        json.loads((cluster["out"] / f"restore{world}-rank{r}.json").read_text())
        for r in range(world)
    ]


def test_a_node_killed_mid_save_fails_the_save_on_every_surviving_rank(
    cluster: dict[str, Any],
) -> None:
    for rank in cluster["survivors"]:
        assert rank["world_size"] == 4 and rank["node"] == 0
        assert rank["kill_error"] is not None
        # in save(2) or in wait(), as the background write and the kill happen to order
        assert rank["kill_error"].startswith("CheckpointError: "), rank["kill_error"]
        assert "the ranks lost contact" in rank["kill_error"]
        assert rank["failed_at"] - cluster["killed_at"] < 60  # within the group's timeout


@pytest.mark.parametrize("where", [0, 1], ids=["local", "s3"])
def test_nothing_of_the_killed_save_is_committed(cluster: dict[str, Any], where: int) -> None:
    options = cluster["s3"].storage_options if where else None
    with Checkpointer(cluster["dirs"][where], storage_options=options, read_only=True) as reader:
        assert [info.step for info in reader.list()] == [0, 1]


@pytest.mark.parametrize(("nnodes", "nproc"), [(1, 1), (1, 2), (2, 2)])
def test_restore_onto_1_2_and_4_ranks_is_exact_from_local_and_s3(
    cluster: dict[str, Any], nnodes: int, nproc: int
) -> None:
    ranks = _restore(cluster, nnodes, nproc)
    for rank in ranks:
        assert rank["world_size"] == nnodes * nproc
        for where in ("dir0", "dir1"):
            assert rank[where]["step"] == 1 and rank[where]["epoch"] == 1  # the previous one
    assert ranks[0]["dir0"]["equal"] is True and ranks[0]["dir1"]["equal"] is True
