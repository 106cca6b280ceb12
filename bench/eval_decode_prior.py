"""Evaluate finished sft/dpo stages again with ``decode_prior``, paired against their own ranks.

    python bench/eval_decode_prior.py --pipeline configs/beauty/pipeline.yaml \
        --runs runs/exp_beauty_pref6/runs/sft --seeds 0,1,2 --alphas 0.15,0.3 \
        --out runs/prior_beauty

``model.init_args.decode_prior`` (alpha) changes decoding only: beam search ranks items by
``log p(item | prompt) - alpha * log prior(item)``, the prior being the items' training counts
(plus one) spread over the code tree. So a trained stage can be evaluated with several alphas
without training again:

1. each ``<runs>/seed<k>`` (a pipeline run directory of seed ``k`` with finished sasrec,
   tokenizer and sft (and dpo) stages) is copied to ``<out>/seed<k>`` (the original is only
   read);
2. the stage's exported model (``sft/hf``, or ``dpo/hf`` with ``--stage dpo``) is evaluated
   on the validation and test splits of the sft stage's data with every alpha; with
   ``--check`` first with the stage's own alpha (the ``decode_prior`` it was made with, in
   ``<stage>/hf/align3gr_sft.json``), which must reproduce its recorded validation metrics;
3. the per-user ranks are paired with the stage's own (``<stage>/ranks_<split>.npy``): N@10 /
   R@10 means per alpha and the paired differences over the users (seeds pooled, bootstrap
   95% interval) on both splits. Validation chooses; test is reported.

Any ``--trainer.*``/``--model.*``/``--data.*`` flag the runs were made with goes to every
stage, as with ``cli.py pipeline``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_user_refresh import stage_cli_for  # noqa: E402

SPLITS = ("valid", "test")


def evaluate_seed(pipeline_yaml: Path, source: Path, run_dir: Path, seed: int,
                  flags: list[str], stage: str, alphas: list[float], check: bool) -> dict:
    import numpy as np

    from lightning_modules.generative_recommender import GenerativeRecommender

    for name in ("sasrec", "tokenizer", "sft", stage):
        if not (source / name / "stage.json").exists():
            raise FileNotFoundError(f"{source / name}: no finished {name} stage")
        if not (run_dir / name / "stage.json").exists():
            shutil.copytree(source / name, run_dir / name, dirs_exist_ok=True)
    recorded = json.loads((run_dir / stage / "stage.json").read_text())
    own = stage_alpha(run_dir / stage)
    cli = stage_cli_for(pipeline_yaml, "sft", run_dir, seed, flags)
    result = {"seed": seed, "stage": stage, "own_alpha": own, "alphas": {}}
    for alpha in ([own] if check else []) + alphas:
        t0 = time.perf_counter()
        model = GenerativeRecommender.from_pretrained_dir(
            run_dir / stage / "hf", trainable=False, num_beams=cli.model.num_beams,
            ks=cli.model.ks, exclude_history=cli.model.exclude_history, decode_prior=alpha)
        got = {}
        for split in SPLITS if alpha != own else ("valid",):
            run = cli.trainer.validate if split == "valid" else cli.trainer.test
            run(model, datamodule=cli.datamodule, verbose=False)
            got[split] = dict(model.results[split])
            np.save(run_dir / f"ranks_{split}_{stage}_prior{alpha:g}.npy",
                    np.asarray(model.last_ranks[split][1]))
        if alpha == own:
            want = recorded["valid"]
            if any(abs(got["valid"][k] - want[k]) > 1e-9 for k in want):
                raise RuntimeError(f"{run_dir / stage}: validating its exported model gave "
                                   f"{got['valid']}, the stage recorded {want}")
        result["alphas"][f"{alpha:g}"] = {**got, "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({"seed": seed, "alpha": alpha, **got}), flush=True)
    return result


def stage_alpha(stage_dir: Path) -> float:
    """The ``decode_prior`` a stage decoded with (0 for stages made before the option)."""
    info = json.loads((stage_dir / "hf" / "align3gr_sft.json").read_text())
    return float(info.get("decode_prior", 0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="the runs' pipeline YAML")
    parser.add_argument("--runs", required=True, help="folder of seed<k> run directories")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--alphas", default="0.15,0.3",
                        help="comma-separated alphas other than the stage's own (negative: "
                             "toward popular items)")
    parser.add_argument("--out", required=True, help="where the copies and results go")
    parser.add_argument("--stage", default="sft", choices=["sft", "dpo"],
                        help="whose exported model (<stage>/hf) is evaluated")
    parser.add_argument("--check", action="store_true",
                        help="first validate with the stage's own alpha, which must reproduce "
                             "the stage")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args, passthrough = parser.parse_known_args()
    logging.basicConfig(level=logging.WARNING)
    alphas = [float(a) for a in args.alphas.split(",")]

    import numpy as np

    from lightning_modules.components.statistics import paired_bootstrap, per_user_metrics

    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    own = set()
    for seed in seeds:
        run_dir = out / f"seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        alpha = stage_alpha(Path(args.runs) / f"seed{seed}" / args.stage)
        own.add(alpha)
        if alpha in alphas:
            parser.error(f"--alphas {args.alphas!r}: {alpha:g} is the alpha "
                         f"{Path(args.runs) / f'seed{seed}' / args.stage} was made with; its own "
                         "ranks are the reference")
        done = run_dir / f"result_{args.stage}.json"  # a seed already evaluated is not again
        if not done.exists() or sorted(json.loads(done.read_text())["alphas"]) != sorted(
                [f"{a:g}" for a in alphas] + ([f"{alpha:g}"] if args.check else [])):
            result = evaluate_seed(Path(args.pipeline), Path(args.runs) / f"seed{seed}",
                                   run_dir, seed, passthrough, args.stage, alphas, args.check)
            done.write_text(json.dumps(result))

    def pooled(split: str, name: str | None) -> dict:
        files = [out / f"seed{s}" / (f"ranks_{split}_{args.stage}_prior{name}.npy" if name
                                     else f"{args.stage}/ranks_{split}.npy") for s in seeds]
        per = [per_user_metrics(np.load(f)) for f in files]
        return {m: np.concatenate([p[m] for p in per]) for m in ("ndcg@10", "recall@10")}

    table = {}
    if len(own) > 1:
        parser.error(f"the seeds' {args.stage} stages were made with different alphas {own}")
    own = own.pop()
    print(f"\n{args.stage} stage, {len(seeds)} seeds; differences against alpha {own:g} (the "
          "stage's own ranks), paired over the users, seeds pooled, bootstrap 95%:\n"
          "| alpha | valid N@10 | test N@10 | test R@10 | valid Δ N@10 | test Δ N@10 | "
          "test Δ R@10 |\n|---|---|---|---|---|---|---|")
    base = {split: pooled(split, None) for split in SPLITS}
    print(f"| {own:g} | {base['valid']['ndcg@10'].mean():.4f} | "
          f"{base['test']['ndcg@10'].mean():.4f} | {base['test']['recall@10'].mean():.4f} | | | |")
    for alpha in alphas:
        got = {split: pooled(split, f"{alpha:g}") for split in SPLITS}
        diff = {f"{split} {m}": paired_bootstrap(got[split][m], base[split][m],
                                                 resamples=args.resamples, seed=0)
                for split, m in (("valid", "ndcg@10"), ("test", "ndcg@10"),
                                 ("test", "recall@10"))}
        table[f"{alpha:g}"] = {"means": {f"{s} {m}": float(got[s][m].mean()) for s in SPLITS
                                         for m in ("ndcg@10", "recall@10")}, "paired": diff}

        def fmt(b):
            text = f"{b['mean_diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]"
            return f"**{text}**" if b["excludes_zero"] else text
        print(f"| {alpha:g} | {got['valid']['ndcg@10'].mean():.4f} | "
              f"{got['test']['ndcg@10'].mean():.4f} | {got['test']['recall@10'].mean():.4f} | "
              + " | ".join(fmt(b) for b in diff.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": seeds, "stage": args.stage,
                                               "own_alpha": own, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
