"""Self-play pair making of the dpo stage, per preference stage: beam search over the epoch's
prompts, then the reference log-probs of the pairs, taken from the beams (what the stage
does when the stage was just opened) against scoring every item again, on the same pairs.
Prints a table (seconds, speed-up, largest difference of the two reference tensors).

    python bench/bench_selfplay.py --run_dir runs/ml100k
    python bench/bench_selfplay.py --run_dir runs/beauty --dataset Beauty --source lcrec_json \
        --data-dir ../shared/data/Beauty --prompts-per-user 1 --max-prompts 10000

``--run_dir`` must hold a finished sft stage (``sft/hf``) and its tokenizer stage, e.g. the
main job's run directory. The two reference computations alternate ``--repeats`` times and
the best time of each is kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from callbacks.selfplay import SelfPlayCallback  # noqa: E402
from datamodules.preference_data import PreferenceDataModule  # noqa: E402
from lightning_modules.preference_aligner import PreferenceAligner, PreferenceStage  # noqa: E402


def bench_stage(name: str, args) -> dict:
    dm = PreferenceDataModule(dataset=args.dataset, source=args.source, data_dir=args.data_dir,
                              run_dir=args.run_dir, seqrec_mode="sequence", inject_user=True,
                              prompts_per_user=args.prompts_per_user,
                              max_prompts=args.max_prompts, num_negatives=20,
                              eval_batch_size=64, seed=0)
    model = PreferenceAligner(run_dir=args.run_dir,
                              stages=[PreferenceStage(name, 1, 1e-6)]).prepare(dm)
    stage = model.schedule[0]
    callback = SelfPlayCallback(num_beams=args.num_beams, batch_size=args.batch_size,
                                progress_bar=False)
    model.begin_stage(0)  # the policy is the reference from here on
    specs = dm.sample_specs(0, stage.negatives)
    start = time.perf_counter()
    candidates, scores = callback.generate(None, model, dm.prompt_texts(specs),
                                           dm.beam_exclusions(specs, stage.negatives))
    generation = time.perf_counter() - start
    pairs = dm.build_pairs(specs, stage.negatives, candidates, epoch=0)
    seconds = {"every item": [], "from beams": []}
    refs = {}
    for _ in range(args.repeats):
        for how in seconds:
            start = time.perf_counter()
            refs[how] = callback.reference(
                None, model, pairs, beams=(candidates, scores) if how == "from beams" else None)
            seconds[how].append(time.perf_counter() - start)
    full, fast = (torch.cat([r[0].unsqueeze(1), r[1]], dim=1)
                  for r in (refs["every item"], refs["from beams"]))
    best = {how: min(v) for how, v in seconds.items()}
    return {"stage": name, "prompts": len(specs), "pairs": len(pairs),
            "negatives": int(pairs.rejected_mask.sum()), "generation s": generation,
            "reference s (every item)": best["every item"],
            "reference s (from beams)": best["from beams"],
            "speed-up": best["every item"] / best["from beams"],
            "max |diff|": float((full - fast).abs().max()) if len(pairs) else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run_dir", required=True, help="run directory with tokenizer/ and sft/hf")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--source", default="auto", help="lcrec_json | recbole | auto")
    ap.add_argument("--data-dir", default=None, help="folder of the dataset's files")
    ap.add_argument("--prompts-per-user", type=int, default=3,
                    help="training positions per user (configs/ml100k/dpo.yaml: 3)")
    ap.add_argument("--max-prompts", type=int, default=None,
                    help="cap on prompts (configs/beauty/dpo.yaml: 10000)")
    ap.add_argument("--stages", nargs="+", default=["sp_easy", "sp_medium", "sp_hard"])
    ap.add_argument("--num-beams", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64, help="prompts per forward")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [bench_stage(name, args) for name in args.stages]
    cols = list(rows[0])
    print(f"\nSelf-play pairs on {args.dataset} ({args.run_dir}), torch threads "
          f"{torch.get_num_threads()}, beam {args.num_beams}, best of {args.repeats}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.1e}" if c == "max |diff|" else f"{r[c]:.2f}" if isinstance(r[c], float)
                 else f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
