"""SASRec on full MovieLens-100K under the project's protocol: test metrics and seconds per epoch.

    python bench/bench_sasrec.py                      # our SASRec (configs/ml100k/sasrec.yaml)
    python bench/bench_sasrec.py --train_stride 20 --threads 2

Prints a markdown table. "epoch" means one pass over the training windows; with
``--train_stride 20`` every training position is a target exactly once (RecBole's epoch covers
every prefix once, i.e. the same targets). Reference on the same split and 2 CPU cores:
RecBole 1.2.1 SASRec (CE) test R@10 0.1145, N@10 0.0543, 39 s per epoch (README, protocol).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import Align3CLI  # noqa: E402


class EpochTimer(L.Callback):
    """Wall time of the training part of each epoch (validation excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._start)


def run_ours(stride: int, max_epochs: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cli = Align3CLI(args=["--config", str(ROOT / "configs/ml100k/sasrec.yaml"),
                              f"--data.init_args.train_stride={stride}",
                              f"--trainer.max_epochs={max_epochs}",
                              f"--trainer.default_root_dir={tmp}", "--trainer.logger=false",
                              "--trainer.enable_progress_bar=false"], run=False)
        timer = EpochTimer()
        cli.trainer.callbacks.append(timer)
        for cb in cli.trainer.callbacks:
            if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint):
                cb.dirpath = tmp
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        total = time.perf_counter() - start
        test = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best",
                                verbose=False)[0]
    return {"name": f"ours SASRec-CE (stride {stride})",
            "test": {k.split("/")[1]: v for k, v in test.items()},
            "sec_per_epoch": sum(timer.times) / max(1, len(timer.times)),
            "epochs": len(timer.times), "total_seconds": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_stride", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--max_epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice)")
    parser.add_argument("--recbole", type=int, default=0, metavar="EPOCHS",
                        help="also time RecBole 1.2.1's SASRec for this many epochs "
                             "(needs recbole installed; see bench/recbole_sasrec.py)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    L.seed_everything(42)
    rows = [run_ours(s, args.max_epochs, args.threads) for s in args.train_stride]
    if args.recbole:
        import subprocess
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "recbole.json"
            subprocess.run([sys.executable, str(ROOT / "bench/recbole_sasrec.py"), "--epochs",
                            str(args.recbole), "--json", str(out)], check=True)
            rows.append(json.loads(out.read_text()))
    print("\n| model | test R@5 | test R@10 | test N@5 | test N@10 | s/epoch | epochs | total s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["test"]
        print(f"| {r['name']} | {t.get('recall@5', 0):.4f} | {t.get('recall@10', 0):.4f} | "
              f"{t.get('ndcg@5', 0):.4f} | {t.get('ndcg@10', 0):.4f} | "
              f"{r['sec_per_epoch']:.2f} | {r['epochs']} | {r['total_seconds']:.0f} |")
    if args.recbole:
        ref = rows[-1]["sec_per_epoch"]
        for r in rows[:-1]:
            print(f"{r['name']}: {ref / r['sec_per_epoch']:.1f}x faster per epoch than RecBole")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
