"""How a torchrun test worker ends once its results are written."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import torch.distributed as dist

__all__ = ["end_rank"]


def end_rank() -> NoReturn:
    """Destroy the process group, then exit 0 without the interpreter's shutdown.

    Even after `destroy_process_group`, gloo's C++ threads can call std::terminate while Python
    finalises ("terminate called without an active exception", SIGABRT: seen in about 1 of 12
    launches of the Lightning and FSDP workers here, and once in CI). The rank's work is done
    and its results are closed files by now, so nothing is lost by skipping the finalisation.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
