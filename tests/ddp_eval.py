"""Evaluate a checkpoint with the test loop and dump the metrics (rank 0) to a JSON file.

Used by the tests to compare a 2-process DDP evaluation with a single-process one:
    python tests/ddp_eval.py OUT.json --config ... --ckpt_path ... [--trainer.devices 2 ...]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import Align3CLI, end_distributed  # noqa: E402


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    ckpt = args[args.index("--ckpt_path") + 1]
    args = [a for i, a in enumerate(args) if a != "--ckpt_path" and args[i - 1] != "--ckpt_path"]
    cli = Align3CLI(args=args, run=False)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    if cli.trainer.is_global_zero:
        Path(out).write_text(json.dumps({"world_size": cli.trainer.world_size,
                                         "metrics": results[0]}))
    end_distributed()


if __name__ == "__main__":
    main()
