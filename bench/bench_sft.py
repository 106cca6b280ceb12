"""SFT throughput on ML-100K: training tokens/s (data pipeline + forward + backward + AdamW) and
beam-search users/s, per backbone size and seqrec form. Prints a table.

    python bench/bench_sft.py                       # tiny default model, both seqrec forms
    python bench/bench_sft.py --threads 2 --steps 30 --sizes 64x2 128x4 256x4
    python bench/bench_sft.py --scid-dir runs/ml100k/tokenizer   # codes of a real tokenizer run

Without ``--scid-dir`` a random SCID map (3 levels x 32 codes, users too) stands in: speed
depends on the number of code levels and the vocabulary, not on what the codes mean.
``s/epoch`` extrapolates the measured rate to the examples of one epoch with the default
task weights of ``configs/ml100k/sft.yaml``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datamodules.sft_data import SFTDataModule  # noqa: E402
from lightning_modules.components.backbone import BackboneConfig, count_parameters  # noqa: E402
from lightning_modules.components.scid_map import SCIDMap  # noqa: E402
from lightning_modules.generative_recommender import GenerativeRecommender  # noqa: E402

TASKS = {"seqrec": 1.0, "item2index": 0.5, "index2item": 0.25, "user2index": 0.5,
         "index2user": 0.25, "fusionseqrec": 0.1}


class _Trainer:  # the one attribute configure_model() reads
    def __init__(self, dm):
        self.datamodule = dm


def random_scid(num_items: int, num_users: int, sizes=(32, 32, 32), seed: int = 0) -> SCIDMap:
    rng = np.random.default_rng(seed)

    def codes(n):
        flat = rng.choice(int(np.prod(sizes)), size=n, replace=False)
        return torch.tensor(np.stack(np.unravel_index(flat, sizes), axis=1))

    return SCIDMap(codes(num_items), list(sizes), codes(num_users), list(sizes))


def bench_one(scid_dir: str, size: str, mode: str, args) -> dict:
    hidden, layers = (int(x) for x in size.split("x"))
    dm = SFTDataModule(dataset="ml-100k", scid_dir=scid_dir, tasks=TASKS, seqrec_mode=mode,
                       batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, seed=0)
    dm.setup("fit")
    model = GenerativeRecommender(backbone=BackboneConfig(
        hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 32),
        intermediate_size=3 * hidden))
    model._trainer = _Trainer(dm)
    model.configure_model()
    model._trainer = None
    net = model.model.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loader = dm.train_dataloader()
    epoch_examples = len(loader.dataset)
    it = iter(loader)
    tokens = examples = 0
    elapsed = 0.0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(it)  # collation (tokenization) counts: it is part of training
        loss = net(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            elapsed += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
            examples += batch["input_ids"].shape[0]
    tok_s = tokens / elapsed
    ex_s = examples / elapsed
    # Beam search (evaluation / serving): users per second.
    rows = torch.arange(min(args.eval_users, len(dm.split.users)))
    seen = [dm.split.seen_items(int(r), "test").tolist() for r in rows]
    t0 = time.perf_counter()
    for s in range(0, len(rows), args.eval_batch_size):
        prompts = model.build_prompts(rows[s:s + args.eval_batch_size], "test")
        model.recommend(prompts, seen[s:s + args.eval_batch_size], num_beams=20)
    users_s = len(rows) / (time.perf_counter() - t0)
    return {"size": size, "params": count_parameters(net)["total"], "mode": mode,
            "tok/step": tokens / args.steps, "tok/s": tok_s, "ex/epoch": epoch_examples,
            "s/epoch": epoch_examples / ex_s, "users/s": users_s,
            "eval s (943 users)": len(dm.split.users) / users_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["128x4"], help="HIDDENxLAYERS backbones")
    ap.add_argument("--modes", nargs="+", default=["sequence", "prompt"])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--eval-users", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--scid-dir", default=None, help="tokenizer folder with scid_map.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        scid_dir = args.scid_dir
        if scid_dir is None:
            from datamodules.sources import load_dataset

            data = load_dataset("ml-100k")
            random_scid(data.num_items, data.num_users).save(tmp)
            scid_dir = tmp
        rows = [bench_one(scid_dir, size, mode, args) for size in args.sizes
                for mode in args.modes]
    cols = ["size", "params", "mode", "tok/step", "tok/s", "ex/epoch", "s/epoch", "users/s",
            "eval s (943 users)"]
    print(f"\nSFT on ML-100K, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:,.0f}" if isinstance(r[c], float) and r[c] >= 100 else
                 f"{r[c]:.2f}" if isinstance(r[c], float) else
                 f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
