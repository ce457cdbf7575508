"""An S3 endpoint on loopback for tests and benchmarks: moto's server mode, one bucket.

`moto_s3()` starts `moto.server.ThreadedMotoServer` on 127.0.0.1 (a free port), creates a
bucket and yields an `S3Endpoint` whose `storage_options` s3fs takes. Nothing leaves the
machine: the server listens on loopback only and stops when the block exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ports import free_port

__all__ = ["S3Endpoint", "moto_s3"]


@dataclass(frozen=True)
class S3Endpoint:
    """A running loopback S3 server with one bucket."""

    endpoint_url: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """What `Checkpointer(..., storage_options=...)` and s3fs need to reach it."""
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point s3fs (and the `haltpoint` command) at it."""
        return {
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint_url,
            "FSSPEC_S3_KEY": "testing",
            "FSSPEC_S3_SECRET": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def url(self, name: str) -> str:
        """An `s3://` URL for a fresh run directory in the bucket."""
        return f"s3://{self.bucket}/{name}"

    def fresh(self, where: str, prefix: str) -> tuple[str, dict[str, Any] | None]:
        """A fresh run URL named `prefix-...` on `where` ("s3": this bucket, or "memory"),
        with the storage options it needs."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        if where == "s3":
            return self.url(name), self.storage_options
        return f"memory://{name}", None


@contextlib.contextmanager
def _server_process() -> Iterator[str]:
    """moto's server in a child process (its own interpreter, so it does not share our GIL)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's server did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _server_thread() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def moto_s3(bucket: str | None = None, *, process: bool = False) -> Iterator[S3Endpoint]:
    """Start moto's S3 server on 127.0.0.1 and yield an endpoint with an empty bucket.

    Args:
        process: run the server in a child process instead of a thread of this one (for
            throughput measurements: a server thread competes with the client for the GIL).
    """
    import boto3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    with _server_process() if process else _server_thread() as url:
        endpoint = S3Endpoint(url, bucket or f"hp-{uuid.uuid4().hex[:12]}")
        client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=endpoint.bucket)
        yield endpoint
