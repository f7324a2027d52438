"""Distributed-tier set-up: the rank helpers (dist_*.py) importable by module name, as spawned ranks import them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
