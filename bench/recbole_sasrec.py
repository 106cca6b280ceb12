"""RecBole 1.2.1's SASRec (CE loss, its defaults) on the same ML-100K files and split.

The reference implementation of the baseline, run side by side with ours by
``bench/bench_sasrec.py --recbole``. RecBole is not a dependency of the project; install it
into the environment first:

    pip install --no-deps recbole==1.2.1 colorlog colorama texttable tabulate thop pandas scipy
    python bench/recbole_sasrec.py --epochs 3 --json out.json

RecBole 1.2.1 predates NumPy 2 and PyTorch 2.6, so this script restores the removed NumPy
aliases it uses, stubs its optional ``ray`` import, and loads its own checkpoints with
``weights_only=False`` (they are files it just wrote).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _compat() -> None:
    for name in ("ray", "ray.tune"):
        sys.modules.setdefault(name, types.ModuleType(name))
    for name, value in [("float_", np.float64), ("complex_", np.complex128),
                        ("unicode_", np.str_), ("float", float), ("int", int),
                        ("bool", bool), ("object", object), ("long", int)]:
        if name not in np.__dict__:
            setattr(np, name, value)
    original = torch.load

    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return original(*args, **kwargs)

    torch.load = load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    _compat()
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    from datamodules.sources.movielens import fetch_recbole_copy  # sha256-verified files

    work = Path(tempfile.mkdtemp(prefix="recbole"))
    fetch_recbole_copy(work / "ml-100k")
    cfg = Config(model="SASRec", dataset="ml-100k", config_dict={
        "data_path": str(work), "checkpoint_dir": str(work / "saved"), "loss_type": "CE",
        "MAX_ITEM_LIST_LENGTH": 20, "metrics": ["Recall", "NDCG"], "topk": [5, 10],
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full",
                      "group_by": "user"},
        "valid_metric": "NDCG@10", "epochs": args.epochs, "stopping_step": 5, "seed": 2020,
        "train_neg_sample_args": None, "show_progress": False, "device": "cpu",
        "use_gpu": False, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}})
    init_seed(cfg["seed"], cfg["reproducibility"])
    dataset = create_dataset(cfg)
    train, valid, test = data_preparation(cfg, dataset)
    trainer = Trainer(cfg, SASRec(cfg, train.dataset))
    epoch_times: list[float] = []
    original = trainer._train_epoch

    def timed(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        epoch_times.append(time.perf_counter() - start)
        return out

    trainer._train_epoch = timed
    trainer.fit(train, valid, saved=True, show_progress=False)
    result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    row = {"name": "RecBole 1.2.1 SASRec-CE",
           "test": {k.lower(): float(v) for k, v in result.items()},
           "sec_per_epoch": sum(epoch_times) / max(1, len(epoch_times)),
           "epochs": len(epoch_times), "total_seconds": sum(epoch_times)}
    print(json.dumps(row, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(row))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
