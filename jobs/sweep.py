"""`ray job submit` entrypoint for sweeps: python jobs/sweep.py CONFIG SPACE.yaml [overrides] [--overwrite]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir holds raylm/

from raylm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
