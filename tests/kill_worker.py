"""Run ``cli.main`` and SIGKILL this process at a chosen point (the resume tests).

    python tests/kill_worker.py POINT STAGE -- CLI ARGS...

POINT ``last_ckpt``: right after STAGE's first ``last.ckpt`` of this process is written (inside
the stage, between epochs); ``stage_json``: right before STAGE's ``stage.json`` is written
(every artifact of the stage is on disk).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    point, stage = sys.argv[1], sys.argv[2]
    args = sys.argv[sys.argv.index("--") + 1:]
    from lightning.pytorch.callbacks import ModelCheckpoint

    import cli

    if point == "last_ckpt":
        original = ModelCheckpoint._save_last_checkpoint

        def save_last(self, trainer, monitor_candidates):
            original(self, trainer, monitor_candidates)
            if self.save_last and Path(self.dirpath).parent.name == stage:
                die()

        ModelCheckpoint._save_last_checkpoint = save_last
    elif point == "stage_json":
        original = cli.mark_stage_complete

        def mark(run_dir, name, info):
            if name == stage:
                die()
            return original(run_dir, name, info)

        cli.mark_stage_complete = mark
    else:
        raise SystemExit(f"unknown point {point!r}")
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
