"""`benchmarks/hostile.py`, which crafts hostile run directories (a manifest sealed with a valid
checksum, a run to tamper with), for the tests: `from crafted import hostile`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import hostile

__all__ = ["hostile"]
