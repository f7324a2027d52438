"""`ray job submit` entrypoint for training: python jobs/train.py CONFIG [overrides] [--overwrite]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir holds raylm/

from raylm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
