"""Benchmark of the tokenizer stage on full ML-100K: time, codebook utilization, collisions.

For each quantizer (the default RQ-VAE config and the residual k-means ablation) it runs the
stage exactly as ``cli.py pipeline`` does (``--config`` files in order; fit, validation of the
saved checkpoint, export of the SCIDs) and prints a markdown table.

Collaborative features: the sasrec stage's embeddings when ``--run_dir`` holds a finished sasrec
stage; otherwise a quick stand-in written into a temporary run directory: a truncated SVD of the
training user-item matrix (item2vec-like, users = rows of ``U·sqrt(S)``, items = ``V·sqrt(S)``).

    python bench/bench_tokenizer.py                       # SVD stand-in, cached text embeddings
    python bench/bench_tokenizer.py --cold                # include text encoding (fresh cache)
    python bench/bench_tokenizer.py --run_dir runs/ml100k # real sasrec artifacts
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.base import RecDataModule  # noqa: E402
from lightning_modules.components.artifacts import (  # noqa: E402
    atomic_torch_save,
    mark_stage_complete,
    stage_complete,
)

CONFIGS = {
    "rqvae": ["configs/ml100k/tokenizer.yaml"],
    "residual_kmeans": ["configs/ml100k/tokenizer.yaml",
                        "configs/ablations/tokenizer_residual_kmeans.yaml"],
}


def write_svd_sasrec_stand_in(run_dir: Path, dim: int = 64, max_users: int | None = None) -> None:
    """Fake 'sasrec' stage in ``run_dir``: SVD embeddings of the training interactions."""
    dm = RecDataModule(max_users=max_users)
    dm.load()
    data, split = dm.dataset, dm.split
    rows = np.concatenate([np.full(len(t), u) for u, t in zip(split.users, split.train_items)])
    cols = np.concatenate(split.train_items)
    matrix = torch.zeros(data.num_users, data.num_items)
    matrix[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
    u, s, v = torch.svd_lowrank(matrix, q=dim, niter=4)
    atomic_torch_save((u * s.sqrt()).float().contiguous(),
                      run_dir / "sasrec" / "user_embeddings.pt")
    atomic_torch_save((v * s.sqrt()).float().contiguous(),
                      run_dir / "sasrec" / "item_embeddings.pt")
    mark_stage_complete(run_dir, "sasrec", {"dataset": data.name, "num_items": data.num_items,
                                            "num_users": data.num_users,
                                            "fingerprint": "svd-stand-in"})


def run_stage(configs: list[str], run_dir: Path, extra: list[str]) -> tuple[dict, float]:
    """The pipeline's own stage runner (fit, validate the saved checkpoint, export) on the
    composed YAMLs; returns (the stage record, wall seconds including CLI set-up)."""
    from cli import run_stage as pipeline_stage

    composed = [a for c in configs[1:] for a in ("--config", str(ROOT / c))]
    start = time.perf_counter()
    record = pipeline_stage("tokenizer", str(ROOT / configs[0]), run_dir,
                            composed + ["--trainer.enable_progress_bar=false", *extra])
    return record, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run_dir", help="run directory with a finished sasrec stage")
    parser.add_argument("--quantizers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--cold", action="store_true",
                        help="fresh text-embedding cache, so the time includes text encoding")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="extra CLI overrides, e.g. --trainer.max_epochs=5")
    args, unknown = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    tmp = tempfile.TemporaryDirectory()
    if args.run_dir and stage_complete(args.run_dir, "sasrec"):
        source_dir, collab = Path(args.run_dir), "sasrec stage"
    else:
        source_dir, collab = Path(tmp.name) / "svd", "SVD stand-in (64-d)"
        write_svd_sasrec_stand_in(source_dir)
    extra = list(args.extra) + unknown
    rows = []
    for name in args.quantizers:
        run_dir = Path(tmp.name) / name
        (run_dir / "sasrec").mkdir(parents=True)
        for f in (source_dir / "sasrec").iterdir():
            (run_dir / "sasrec" / f.name).symlink_to(f.resolve())
        stage_extra = list(extra)
        if args.cold:
            stage_extra += ["--data.init_args.text_encoder.init_args.cache_dir",
                            str(Path(tmp.name) / f"text-cache-{name}")]
        metrics, seconds = run_stage(CONFIGS[name], run_dir, stage_extra)
        rows.append((name, seconds, metrics))
    print(f"\nML-100K tokenizer stage ({collab}; {args.threads} CPU threads"
          f"{', text encoding included' if args.cold else ', cached text embeddings'})\n")
    print("| quantizer | seconds | side | utilization per level | collisions before | after |")
    print("|---|---|---|---|---|---|")
    for name, seconds, record in rows:
        stats = _stats(Path(tmp.name) / name)
        for side in ("items", "users"):
            if side not in record:
                continue
            m = record[side]
            util = " / ".join(f"{u:.3f}" for u in m["utilization"])
            print(f"| {name} | {seconds:.1f} | {side} | {util} | "
                  f"{stats[side]['collision_rate_before']:.4f} | {m['collision_rate']:.4f} |")
    tmp.cleanup()


def _stats(run_dir: Path) -> dict:
    import json
    return json.loads((run_dir / "tokenizer" / "codebook_stats.json").read_text())


if __name__ == "__main__":
    main()
