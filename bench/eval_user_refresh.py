"""Test finished sft stages again with refreshed user SCIDs, paired against their own test.

    python bench/eval_user_refresh.py --pipeline configs/beauty/pipeline.yaml \
        --runs runs/exp_beauty/runs/shipped --seeds 0,1,2 --out runs/refresh_beauty

The sft stage's prompts show a user SCID made from the user's training history. Validation
prompts follow exactly that history; test prompts follow one more item (the validation one),
which the SCID does not know. ``model.init_args.user_scid_refresh`` shows test prompts the
user's SCID re-encoded from the test history instead. Training and validation do not change
with it, so a trained sft stage can be tested both ways without training again:

1. each ``<runs>/seed<k>`` (a pipeline run directory of seed ``k`` with finished sasrec,
   tokenizer and sft (and dpo) stages) is copied to ``<out>/seed<k>`` (the original is only read);
2. the sasrec stage's best checkpoint writes the users' states after the later splits'
   histories (and again those of the training history, which must equal the stage's own);
3. the tokenizer's checkpoint exports the SCID map again, now with the users' refreshed
   codes (its item and user codes must equal the stage's own);
4. the stage's exported model (``sft/hf``, or ``dpo/hf`` with ``--stage dpo``) is tested
   on the sft stage's data with ``user_scid_refresh`` off and on (the way the stage itself
   tested must reproduce its test metrics).

Prints per seed and pooled: test N@10 / R@10 both ways, and the paired differences over the
test users (seeds pooled, bootstrap 95% interval) of refreshed against fixed and of both
against the runs' own sasrec stage; ``--json`` writes the same. Validation
is the same both ways by construction, so it cannot choose between them. Any
``--trainer.*``/``--model.*``/``--data.*`` flag the runs were made with goes to every stage,
as with ``cli.py pipeline``.
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

STAGES = ("sasrec", "tokenizer", "sft")  # what every run needs; --stage dpo adds dpo


def stage_cli_for(pipeline_yaml: Path, name: str, run_dir: Path, seed: int, extra: list[str]):
    """The stage's LightningCLI objects as ``cli.py pipeline`` builds them for seed ``seed``."""
    import yaml

    from cli import _dataset_block, pipeline_stage_extra, stage_args, stage_cli

    spec = yaml.safe_load(pipeline_yaml.read_text())
    stage = next(s for s in spec["stages"] if s["name"] == name)
    _, block = _dataset_block(argparse.ArgumentParser(), pipeline_yaml, spec.get("dataset"))
    flags = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}", *extra]
    args = pipeline_stage_extra(stage, run_dir, block, [str(a) for a in spec.get("overrides", [])],
                                [], flags)
    return stage_cli(stage_args(name, stage["config"], run_dir, args))


def refresh_seed(pipeline_yaml: Path, source: Path, run_dir: Path, seed: int,
                 flags: list[str], stage: str = "sft") -> dict:
    import numpy as np
    import torch

    from lightning_modules.components.artifacts import USER_EMBEDDING_FILES
    from lightning_modules.components.scid_map import load_scid_map
    from lightning_modules.dual_tokenizer import DualTokenizer
    from lightning_modules.generative_recommender import GenerativeRecommender
    from lightning_modules.sasrec import SASRec

    for name in (*STAGES, stage):
        if not (source / name / "stage.json").exists():
            raise FileNotFoundError(f"{source / name}: no finished {name} stage")
        if not (run_dir / name / "stage.json").exists():
            shutil.copytree(source / name, run_dir / name, dirs_exist_ok=True)
    t0 = time.perf_counter()
    # 2. the sasrec states
    dm = stage_cli_for(pipeline_yaml, "sasrec", run_dir, seed, flags).datamodule
    dm.setup("fit")
    sasrec = SASRec.load_from_checkpoint(run_dir / "sasrec" / "checkpoints" / "best.ckpt",
                                         map_location="cpu")
    out = run_dir / "sasrec" / "refreshed"
    out.mkdir(exist_ok=True)
    sasrec.write_embeddings(dm, out)
    for name in ("item_embeddings.pt", USER_EMBEDDING_FILES["valid"]):
        if not torch.equal(torch.load(out / name), torch.load(run_dir / "sasrec" / name)):
            raise RuntimeError(f"{out / name}: differs from the stage's own {name}; the "
                               "checkpoint is not the one the stage exported from")
    for name in USER_EMBEDDING_FILES.values():
        shutil.copy2(out / name, run_dir / "sasrec" / name)
    # 3. the SCID map with refreshed user codes
    before = load_scid_map(run_dir / "tokenizer")
    cli = stage_cli_for(pipeline_yaml, "tokenizer", run_dir, seed, flags)
    tok = DualTokenizer.load_from_checkpoint(
        run_dir / "tokenizer" / "checkpoints" / "tokenizer.ckpt", map_location="cpu",
        run_dir=str(run_dir))
    tok.attach_data(**cli.datamodule.tokenizer_inputs())
    tok.export_artifacts()
    after = load_scid_map(run_dir / "tokenizer")
    if not (torch.equal(before.item_codes, after.item_codes)
            and torch.equal(before.user_codes, after.user_codes)):
        raise RuntimeError(f"{run_dir / 'tokenizer'}: the exported codes differ from the "
                           "stage's own; the checkpoint is not the one the stage exported from")
    moved = (after.user_refreshed_codes["test"] != after.user_codes).any(dim=1).float().mean()
    # 4. the stage's exported model tested both ways, on the data the sft stage reads
    recorded = json.loads((run_dir / stage / "stage.json").read_text())["test"]
    # The way the stage itself tested (stages made before the option: fixed SCIDs).
    made_refreshed = bool(json.loads((run_dir / stage / "hf" / "align3gr_sft.json")
                                     .read_text()).get("user_scid_refresh", False))
    result = {"seed": seed, "stage": stage, "users_with_new_test_scid": float(moved),
              "stage_tested": "refreshed" if made_refreshed else "fixed"}
    cli = stage_cli_for(pipeline_yaml, "sft", run_dir, seed, flags)
    for refresh in (False, True):
        model = GenerativeRecommender.from_pretrained_dir(
            run_dir / stage / "hf", trainable=False, num_beams=cli.model.num_beams,
            ks=cli.model.ks, exclude_history=cli.model.exclude_history,
            user_scid_refresh=refresh)
        cli.trainer.test(model, datamodule=cli.datamodule, verbose=False)
        metrics = dict(model.results["test"])
        ranks = model.last_ranks["test"][1]
        key = "refreshed" if refresh else "fixed"
        result[key] = metrics
        np.save(run_dir / f"ranks_test_{stage}_{key}.npy", np.asarray(ranks))
        if refresh == made_refreshed and any(abs(metrics[k] - recorded[k]) > 1e-9
                                             for k in recorded):
            raise RuntimeError(f"{run_dir / stage}: testing its exported model gave {metrics}, "
                               f"the stage recorded {recorded}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="the runs' pipeline YAML")
    parser.add_argument("--runs", required=True, help="folder of seed<k> run directories")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", required=True, help="where the copies and results go")
    parser.add_argument("--stage", default="sft", choices=["sft", "dpo"],
                        help="whose exported model (<stage>/hf) is tested")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args, passthrough = parser.parse_known_args()
    logging.basicConfig(level=logging.WARNING)

    import numpy as np

    from lightning_modules.components.statistics import (
        paired_bootstrap,
        per_user_metrics,
        t_interval,
    )

    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for seed in seeds:
        run_dir = out / f"seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        done = run_dir / f"result_{args.stage}.json"  # a seed already tested is not again
        if not done.exists():
            result = refresh_seed(Path(args.pipeline), Path(args.runs) / f"seed{seed}",
                                  run_dir, seed, passthrough, args.stage)
            done.write_text(json.dumps(result))
        results.append(json.loads(done.read_text()))
        print(json.dumps(results[-1]), flush=True)
    def metrics_of(path: Path) -> dict:
        return per_user_metrics(np.load(path))

    per_key = {key: [metrics_of(out / f"seed{s}" / f"ranks_test_{args.stage}_{key}.npy")
                     for s in seeds] for key in ("fixed", "refreshed")}
    # The runs' own sasrec stage, user by user (the same split rows, in the same order).
    per_key["sasrec"] = [metrics_of(out / f"seed{s}" / "sasrec" / "ranks_test.npy")
                         for s in seeds]

    def pooled(a: str, b: str) -> dict:
        return {metric: paired_bootstrap(np.concatenate([m[metric] for m in per_key[a]]),
                                         np.concatenate([m[metric] for m in per_key[b]]),
                                         resamples=args.resamples, seed=0)
                for metric in ("ndcg@10", "recall@10", "ndcg@5", "recall@5")}

    # The spread between training runs: the t-interval of the per-seed mean differences.
    over_seeds = {metric: t_interval([float(a[metric].mean() - b[metric].mean()) for a, b in
                                      zip(per_key["refreshed"], per_key["fixed"])])
                  for metric in ("ndcg@10", "recall@10")}
    paired = {"refreshed-fixed": pooled("refreshed", "fixed"),
              "fixed-sasrec": pooled("fixed", "sasrec"),
              "refreshed-sasrec": pooled("refreshed", "sasrec")}
    means = {key: {metric: float(np.mean([m[metric].mean() for m in per_key[key]]))
                   for metric in ("ndcg@10", "recall@10")} for key in per_key}
    print(f"\n{args.stage} stage, test split:\n| seed | N@10 fixed | N@10 refreshed | R@10 fixed "
          "| R@10 refreshed | sasrec N@10 | users whose test SCID moved |\n"
          "|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        print(f"| {r['seed']} | {r['fixed']['ndcg@10']:.4f} | {r['refreshed']['ndcg@10']:.4f} | "
              f"{r['fixed']['recall@10']:.4f} | {r['refreshed']['recall@10']:.4f} | "
              f"{per_key['sasrec'][i]['ndcg@10'].mean():.4f} | "
              f"{r['users_with_new_test_scid']:.1%} |")
    print("| mean | " + " | ".join(f"{means[k][m]:.4f}" for k, m in (
        ("fixed", "ndcg@10"), ("refreshed", "ndcg@10"), ("fixed", "recall@10"),
        ("refreshed", "recall@10"), ("sasrec", "ndcg@10"))) + " | |")
    print("\nPaired over the test users of all seeds pooled (bootstrap 95%):")
    for name, table in paired.items():
        print(f"  {name}: " + ", ".join(
            f"{metric} {b['mean_diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]"
            for metric, b in table.items()))
    print("  refreshed-fixed over seeds (t-interval of the per-seed differences): " + ", ".join(
        f"{metric} {t['mean']:+.4f} " + (f"[{t['low']:+.4f}, {t['high']:+.4f}]"
                                          if t["low"] is not None else "(one seed)")
        for metric, t in over_seeds.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": results, "means": means,
                                               "paired": paired, "over_seeds": over_seeds},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
