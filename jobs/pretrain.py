"""A RayJob's one entrypoint: python jobs/pretrain.py CONFIG [overrides] prepares, then trains."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir holds raylm/

from raylm.cli import main  # noqa: E402

if __name__ == "__main__":
    # prepare is a no-op when data.out_dir holds these inputs' shards already, so a resubmitted job goes on to
    # train, which resumes from the run's newest committed checkpoint (checkpoint.resume=auto).
    sys.exit(main(["prepare", *sys.argv[1:]]) or main(["train", *sys.argv[1:]]))
