"""SFT throughput: training tokens/s and rows/s (data pipeline + forward + the stage's loss +
backward + AdamW) and beam-search users/s, per backbone size, seqrec form and batch size.
Prints a table.

    python bench/bench_sft.py                       # ML-100K, tiny default model, both seqrec forms
    python bench/bench_sft.py --threads 2 --steps 30 --sizes 64x2 128x4 256x4
    python bench/bench_sft.py --modes sequence --batch-sizes 32 64 128 \
        --dataset Beauty --source lcrec_json --data-dir ../shared/data/Beauty   # Amazon Beauty
    python bench/bench_sft.py --scid-dir runs/ml100k/tokenizer   # codes of a real tokenizer run
    python bench/bench_sft.py --write-cooc-scid runs/dev/tokenizer   # write a stand-in map, exit
    python bench/bench_sft.py --modes sequence --pack off --precision 32 bf16   # train_precision

Without ``--scid-dir`` a random SCID map (3 levels x 32 codes, users too) stands in: speed
depends on the number of code levels and the vocabulary, not on what the codes mean.
``--write-cooc-scid`` writes a collaborative-only stand-in for the tokenizer stage (residual
k-means over item co-occurrence SVD vectors of the training split, users = mean of their
items, a last level that de-duplicates): the map the SFT quality numbers in the stage report
were measured with while the tokenizer stage was being written.
``s/epoch`` extrapolates the measured rate to the examples of one epoch with the default
task weights of ``configs/ml100k/sft.yaml`` (a dataset without item text or user profiles keeps
only the tasks it can build). ``ms/row`` is the training cost of one row: when it stays flat
as the batch grows, a step is compute-bound and larger batches buy no speed.
``--precision 32 bf16`` times the training step in float32 and under the stage's
``train_precision: bf16`` autocast (``precision`` column; the same model and batches each
time, decoding in float32 either way); on a CPU without native bfloat16 the bf16 rows say
``32`` because the stage falls back.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datamodules.sft_data import SFTDataModule  # noqa: E402
from lightning_modules.components.backbone import BackboneConfig, count_parameters  # noqa: E402
from lightning_modules.components.lm_loss import causal_lm_loss, pack_rows  # noqa: E402
from lightning_modules.components.precision import (  # noqa: E402
    effective_precision,
    training_autocast,
)
from lightning_modules.components.scid_map import SCIDMap  # noqa: E402
from lightning_modules.generative_recommender import GenerativeRecommender  # noqa: E402

TASKS = {"seqrec": 1.0, "item2index": 0.5, "index2item": 0.25, "user2index": 0.5,
         "index2user": 0.25, "fusionseqrec": 0.1}


class _Trainer:  # the attributes configure_model() reads
    def __init__(self, dm):
        self.datamodule = dm
        self.state = SimpleNamespace(fn=SimpleNamespace(value="fit"))


def random_scid(num_items: int, num_users: int, sizes=(32, 32, 32), seed: int = 0) -> SCIDMap:
    rng = np.random.default_rng(seed)

    def codes(n):
        flat = rng.choice(int(np.prod(sizes)), size=n, replace=False)
        return torch.tensor(np.stack(np.unravel_index(flat, sizes), axis=1))

    return SCIDMap(codes(num_items), list(sizes), codes(num_users), list(sizes))


def _kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        for j in range(k):
            members = assign == j
            # An empty cluster restarts at a random point instead of dying.
            centers[j] = x[members].mean(0) if members.any() else x[torch.randint(
                len(x), (1,), generator=g)][0]
    return torch.cdist(x, centers).argmin(1), centers


def _residual_codes(x: torch.Tensor, sizes) -> tuple[torch.Tensor, int]:
    """Residual k-means codes ``[N, len(sizes) + 1]``; the last level numbers duplicates."""
    codes, residual = [], x.clone()
    for size in sizes:
        assign, centers = _kmeans(residual, size)
        codes.append(assign)
        residual = residual - centers[assign]
    codes = torch.stack(codes, 1)
    _, inverse = torch.unique(codes, dim=0, return_inverse=True)
    dedup, seen = torch.zeros(len(x), dtype=torch.long), {}
    for i, group in enumerate(inverse.tolist()):
        dedup[i] = seen.get(group, 0)
        seen[group] = int(dedup[i]) + 1
    return torch.cat([codes, dedup[:, None]], 1), int(dedup.max()) + 1


def cooccurrence_scid(sizes=(32, 32, 32), dim: int = 32) -> SCIDMap:
    """Collaborative-only SCID map of ML-100K from the training split (no held-out item used)."""
    from datamodules.sources import load_dataset
    from datamodules.split import leave_one_out

    data = load_dataset("ml-100k")
    split = leave_one_out(data)
    m = np.zeros((len(split.users), data.num_items), np.float32)  # user x item, training only
    for r, items in enumerate(split.train_items):
        m[r, items] = 1
    co = m.T @ m
    np.fill_diagonal(co, 0)
    co = co / (np.sqrt(co.sum(1, keepdims=True) + 1) * np.sqrt(co.sum(0, keepdims=True) + 1))
    u, s, _ = np.linalg.svd(co)
    items = torch.tensor(u[:, :dim] * np.sqrt(s[:dim]), dtype=torch.float32)
    items = items / (items.norm(dim=1, keepdim=True) + 1e-8)
    users = torch.zeros(data.num_users, dim)
    users[torch.as_tensor(split.users)] = torch.tensor(m) @ items
    users = users / (users.norm(dim=1, keepdim=True) + 1e-8)
    item_codes, item_dedup = _residual_codes(items, sizes)
    user_codes, user_dedup = _residual_codes(users, sizes)
    return SCIDMap(item_codes, list(sizes) + [item_dedup], user_codes,
                   list(sizes) + [user_dedup], meta={"source": "bench_sft cooccurrence"})


def bench_one(scid_dir: str, size: str, mode: str, batch_size: int, args,
              pack: bool = False, precision: str = "32") -> dict:
    hidden, layers = (int(x) for x in size.split("x"))
    dm = SFTDataModule(dataset=args.dataset, source=args.source, data_dir=args.data_dir,
                       scid_dir=scid_dir, tasks=TASKS, seqrec_mode=mode,
                       batch_size=batch_size, eval_batch_size=args.eval_batch_size, seed=0)
    dm.setup("fit")
    model = GenerativeRecommender(backbone=BackboneConfig(
        hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 32),
        intermediate_size=3 * hidden, dropout=args.dropout,
        attention_dropout=args.attention_dropout))
    model._trainer = _Trainer(dm)
    model.configure_model()
    model._trainer = None
    torch.manual_seed(0)  # the same draws of dropout and batches in every configuration
    net = model.model.train()
    precision = effective_precision(precision, torch.device("cpu"), "bench")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loader = dm.train_dataloader()
    epoch_examples = len(loader.dataset)
    it = iter(loader)
    tokens = examples = cells = 0
    elapsed = 0.0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(it)  # collation (tokenization) counts: it is part of training
        with training_autocast(precision, torch.device("cpu")):
            loss = causal_lm_loss(net, batch["input_ids"], batch["attention_mask"],
                                  batch["labels"], pack=pack)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            elapsed += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
            examples += batch["input_ids"].shape[0]
            cells += (pack_rows(batch["input_ids"], batch["attention_mask"], batch["labels"])
                      .input_ids.numel() if pack else batch["input_ids"].numel())
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
            "batch": batch_size, "pack": "on" if pack else "off", "precision": precision,
            "fill": tokens / cells, "tok/step": tokens / args.steps, "tok/s": tok_s,
            "rows/s": ex_s, "ms/row": 1000.0 / ex_s, "ex/epoch": epoch_examples,
            "s/epoch": epoch_examples / ex_s, "users/s": users_s,
            "eval s (all users)": len(dm.split.users) / users_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["128x4"], help="HIDDENxLAYERS backbones")
    ap.add_argument("--modes", nargs="+", default=["sequence", "prompt"])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-sizes", "--batch-size", nargs="+", type=int, default=[32],
                    help="training rows per step (one table row each)")
    ap.add_argument("--dropout", type=float, default=0.2,
                    help="hidden dropout of the built model (configs/ml100k/sft.yaml: 0.2)")
    ap.add_argument("--attention-dropout", type=float, default=0.0,
                    help="attention-probability dropout (the shipped CPU config: 0.0)")
    ap.add_argument("--pack", nargs="+", default=["off", "on"], choices=["off", "on"],
                    help="row packing of the loss (model.init_args.pack_rows): off, on or both")
    ap.add_argument("--precision", nargs="+", default=["32"], choices=["32", "bf16"],
                    help="training-step precision (model.init_args.train_precision): one row each")
    ap.add_argument("--dataset", default="ml-100k", help="dataset name (as data.init_args.dataset)")
    ap.add_argument("--source", default="auto", help="lcrec_json | recbole | auto")
    ap.add_argument("--data-dir", default=None, help="folder of the dataset's files")
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--eval-users", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--scid-dir", default=None, help="tokenizer folder with scid_map.json")
    ap.add_argument("--write-cooc-scid", default=None, metavar="DIR",
                    help="write the co-occurrence stand-in SCID map into DIR and exit")
    args = ap.parse_args()
    if args.write_cooc_scid:
        scid = cooccurrence_scid()
        print(scid.save(args.write_cooc_scid), scid.statistics())
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        scid_dir = args.scid_dir
        if scid_dir is None:
            from datamodules.sources import load_dataset

            data = load_dataset(args.dataset, source=args.source, data_dir=args.data_dir)
            # Enough codes for every item (32^3 ~ 33k; larger catalogues get wider levels).
            width = 32
            while width ** 3 < max(data.num_items, data.num_users):
                width *= 2
            random_scid(data.num_items, data.num_users, sizes=(width,) * 3).save(tmp)
            scid_dir = tmp
        rows = [bench_one(scid_dir, size, mode, batch_size, args, pack=pack == "on",
                          precision=precision)
                for size in args.sizes for mode in args.modes
                for batch_size in args.batch_sizes for pack in args.pack
                for precision in args.precision]
    cols = ["size", "params", "mode", "batch", "pack", "precision", "fill", "tok/step", "tok/s",
            "rows/s", "ms/row", "ex/epoch", "s/epoch", "users/s", "eval s (all users)"]
    print(f"\nSFT on {args.dataset}, torch threads {torch.get_num_threads()}, "
          f"{args.steps} timed steps after {args.warmup}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:,.0f}" if isinstance(r[c], float) and r[c] >= 100 else
                 f"{r[c]:.2f}" if isinstance(r[c], float) else
                 f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
