"""Smoke test of the sft stage at real scale: a Qwen2-0.5B-shaped model built from a config.

Runs the real stage code (LightningCLI + configs/ml100k/sft.yaml) for a few hundred training
steps and a slice of validation beam search, and prints training tokens/s and decoding users/s.

    python bench/gpu_smoke.py --run_dir runs/ml100k            # uses runs/ml100k/tokenizer
    python bench/gpu_smoke.py --steps 50 --precision 32-true --accelerator cpu --size tiny

Without a finished tokenizer stage in ``--run_dir`` a random unique SCID map (4 levels) stands
in: throughput depends on the vocabulary and code length, not on what the codes mean.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import Align3CLI  # noqa: E402
from lightning_modules.components.scid_map import SCIDMap  # noqa: E402

SIZES = {  # name: (arch, hidden, layers, heads, kv_heads, intermediate)
    "qwen2-0.5b": ("qwen2", 896, 24, 14, 2, 4864),
    "llama-1b": ("llama", 2048, 16, 32, 8, 8192),
    "tiny": ("llama", 128, 4, 4, 4, 384),
}


class Throughput(L.Callback):
    """Training tokens (non-padding) per second and validation users per second."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup, self.tokens, self.seconds, self.steps = warmup, 0, 0.0, 0
        self.val_users, self.val_seconds = 0, 0.0

    def _sync(self, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(module)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync(module)
        self.steps += 1
        if self.steps > self.warmup:
            self.seconds += time.perf_counter() - self._t
            self.tokens += int(batch["attention_mask"].sum())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self._sync(module)
        self._v = time.perf_counter()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        self._sync(module)
        if batch_idx > 0:  # first batch warms up kernels
            self.val_seconds += time.perf_counter() - self._v
            self.val_users += int(batch["rows"].shape[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run_dir", default=None, help="run dir with a finished tokenizer stage")
    ap.add_argument("--size", default="qwen2-0.5b", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--eval_batch_size", type=int, default=256)
    ap.add_argument("--val_batches", type=int, default=4)
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--devices", default="1")
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="smoke"))
    if args.run_dir and (Path(args.run_dir) / "tokenizer" / "scid_map.json").exists():
        shutil.copytree(Path(args.run_dir) / "tokenizer", tmp / "tokenizer")
    else:
        rng = np.random.default_rng(0)
        sizes = [64, 64, 64, 8]

        def codes(n: int) -> torch.Tensor:
            flat = rng.choice(int(np.prod(sizes)), size=n, replace=False)
            return torch.tensor(np.stack(np.unravel_index(flat, sizes), axis=1))

        SCIDMap(codes(1682), sizes, codes(943), sizes).save(tmp / "tokenizer")
    arch, hidden, layers, heads, kv, inter = SIZES[args.size]
    bb = "--model.init_args.backbone."
    cli = Align3CLI(args=[
        "--config", str(ROOT / "configs/ml100k/sft.yaml"),
        f"--model.init_args.run_dir={tmp}", f"--data.init_args.run_dir={tmp}",
        f"{bb}arch={arch}", f"{bb}hidden_size={hidden}", f"{bb}num_layers={layers}",
        f"{bb}num_heads={heads}", f"{bb}num_kv_heads={kv}", f"{bb}intermediate_size={inter}",
        f"--model.init_args.lr={args.lr}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.eval_batch_size={args.eval_batch_size}",
        f"--trainer.accelerator={args.accelerator}", f"--trainer.devices={args.devices}",
        f"--trainer.precision={args.precision}", "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={args.steps}",
        f"--trainer.limit_val_batches={args.val_batches}", "--trainer.check_val_every_n_epoch=1",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp}",
        "--trainer.enable_progress_bar=false"], run=False)
    meter = Throughput()
    cli.trainer.callbacks.append(meter)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    total = time.perf_counter() - start
    params = sum(p.numel() for p in cli.model.parameters())
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    print(f"\n| device | model | params | precision | batch | steps | train tokens/s | "
          f"decode users/s (beam {cli.model.hparams.num_beams}) | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {dev} x{args.devices} | {args.size} ({arch}, built from config) | "
          f"{params / 1e6:.0f}M | {args.precision} | {args.batch_size} | {meter.steps} | "
          f"{meter.tokens / max(meter.seconds, 1e-9):,.0f} | "
          f"{meter.val_users / max(meter.val_seconds, 1e-9):,.1f} | {total:.0f} |")
    print("validation on the evaluated slice:", {k: round(v, 4) for k, v in val.items()})
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
