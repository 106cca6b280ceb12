"""Preference-level ablation on ML-100K from a finished sft run: the paper's DPO ablation table.

    python bench/bench_dpo.py --sft-run runs/ml100k
    python bench/bench_dpo.py --sft-run runs/ml100k --variants static progressive_rf \
        --out runs/bench_dpo -- --data.init_args.max_users=200

Each variant is ``configs/ml100k/dpo.yaml`` composed with ``configs/ablations/dpo_<variant>.yaml``
and run by the pipeline's stage runner (fit, best-checkpoint validation, test, export) in its
own folder ``<out>/<variant>/`` whose ``tokenizer/`` and ``sft/`` link to the sft run, so every
variant starts from the same policy. Finished variants are reused (``--force`` redoes them).
Flags after ``--`` go to every run (``--trainer.*``, ``--model.*``, ``--data.*``).

Variants (the rows of the paper's table):
    static          one stage, uniform random negatives (static softmax-DPO)
    selfplay        one stage, the policy's beam candidates, regenerated each epoch
    progressive     self-play easy -> medium -> hard
    progressive_rf  + real feedback: rf_dislike -> rf_neutral (the full method)

Prints a markdown table (test metrics of the sft policy and of every variant, wall time) and
writes it with the raw numbers to ``<out>/bench_dpo.{md,json}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lightning_modules.components.artifacts import (  # noqa: E402
    atomic_write_json,
    atomic_write_text,
    read_json,
    stage_complete,
)

VARIANTS = ("static", "selfplay", "progressive", "progressive_rf")
KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def link_sft(sft_run: Path, variant_dir: Path) -> None:
    """``variant_dir/{tokenizer,sft}`` -> the sft run's folders (symlinks; copies elsewhere)."""
    variant_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "sft"):
        src, dst = (sft_run / name).resolve(), variant_dir / name
        if dst.exists() or dst.is_symlink():
            continue
        try:
            os.symlink(src, dst, target_is_directory=True)
        except OSError:
            import shutil
            shutil.copytree(src, dst)


def run_variant(variant: str, sft_run: Path, out: Path, extra: list[str], force: bool) -> dict:
    from cli import run_stage

    vdir = out / variant
    if stage_complete(vdir, "dpo") and not force:
        logging.warning("%s: complete in %s, reused", variant, vdir)
        return read_json(vdir / "dpo" / "stage.json")
    link_sft(sft_run, vdir)
    config = ROOT / "configs" / "ml100k" / "dpo.yaml"
    ablation = ROOT / "configs" / "ablations" / f"dpo_{variant}.yaml"
    start = time.perf_counter()
    record = run_stage("dpo", str(config), vdir, ["--config", str(ablation), *extra])
    if record is None:  # not rank 0
        return {}
    record.setdefault("seconds", round(time.perf_counter() - start, 1))
    return record


def table(rows: list[tuple[str, dict, float | None]]) -> str:
    lines = ["| model | " + " | ".join(f"test {k}" for k in KEYS) + " | seconds |",
             "|---|" + "---|" * (len(KEYS) + 1)]
    for name, test, seconds in rows:
        cells = [f"{test[k]:.4f}" if k in test else "—" for k in KEYS]
        secs = f"{seconds:.0f}" if seconds is not None else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-run", required=True, type=Path,
                        help="run directory with finished tokenizer/ and sft/ stages")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the variants run (default: <sft-run>/bench_dpo)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--force", action="store_true", help="re-run finished variants")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not stage_complete(args.sft_run, "sft"):
        parser.error(f"{args.sft_run}: the sft stage has not finished there")
    out = args.out or args.sft_run / "bench_dpo"
    sft = read_json(args.sft_run / "sft" / "stage.json")
    rows = [("sft (no preference stage)", sft.get("test", {}), sft.get("seconds"))]
    results = {"sft": {"test": sft.get("test", {}), "valid": sft.get("valid", {})},
               "extra_flags": extra}
    for variant in args.variants:
        record = run_variant(variant, args.sft_run, out, extra, args.force)
        rows.append((variant, record.get("test", {}), record.get("seconds")))
        results[variant] = {k: record.get(k) for k in ("valid", "test", "seconds", "per_stage")}
        text = table(rows)
        print(text, flush=True)
    atomic_write_json(out / "bench_dpo.json", results)
    atomic_write_text(out / "bench_dpo.md", "# Preference-level ablation (test split)\n\n" +
                      table(rows) + "\n")
    print(f"\nwritten: {out / 'bench_dpo.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
