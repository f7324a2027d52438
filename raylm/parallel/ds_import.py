"""DeepSpeed's import without the MLflow import it makes for its autotuner, which raylm never runs (~1 s)."""

from __future__ import annotations

import importlib
import sys


def import_deepspeed() -> None:
    """Import DeepSpeed once per process. DeepSpeed's autotuner imports MLflow at DeepSpeed's import when it is
    installed (its `try: import mlflow`), about a second of a rank's start-up; during this import MLflow reads
    as absent, so the autotuner goes without it, and afterwards MLflow imports as usual (run.trackers)."""
    if "deepspeed" in sys.modules:
        return
    hidden = "mlflow" not in sys.modules
    if hidden:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        importlib.import_module("deepspeed")
    finally:
        if hidden and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
