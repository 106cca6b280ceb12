"""Mixed precision for training steps only (``train_precision: bf16``).

A training step under :func:`training_autocast` runs its matrix products in bfloat16 while
the weights, gradients and optimizer state stay in float32 (``torch.autocast``; the loss's
log-softmax is float32 by autocast's own rules). Evaluation, self-play generation and export
are not touched: beam search scores in float32, so rankings do not depend on bfloat16
rounding or on the batch size.

On CPUs with AMX (``amx_bf16``; Intel Sapphire Rapids and later) bfloat16 matrix products
are 4-8x faster than float32 ones at the sizes of the built models; a training step of
the ML-100K sft model 1.2-1.4x (``bench/bench_sft.py --precision 32 bf16``).
Two costs would eat that gain on the CPU, and both are avoided here:

- PyTorch's CPU flash-attention kernel is far slower in bfloat16 than in float32 (its
  backward pass ran 8x slower at hidden 128), so while a CPU autocast is active the ``sdpa``
  attention function computes in float32 (:func:`install_cpu_fp32_attention`; on any other
  device, or without autocast, it is HF's function unchanged);
- a CPU without native bfloat16 (no ``avx512_bf16``/AMX) emulates it and gets slower, so
  :func:`effective_precision` falls back to float32 there, and says so.

On a GPU, ``bf16`` is the usual mixed precision (there ``trainer.precision: bf16-mixed``
does the same for every step, evaluation included).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

log = logging.getLogger(__name__)

TRAIN_PRECISIONS = ("32", "bf16")


def check_train_precision(value, option: str = "model.init_args.train_precision") -> str:
    """``value`` as one of :data:`TRAIN_PRECISIONS` (``32`` may come as an int)."""
    text = str(value).strip().lower()
    if text in ("32", "32-true", "fp32", "float32"):
        return "32"
    if text in ("bf16", "bf16-mixed", "bfloat16"):
        return "bf16"
    raise ValueError(f"{option} must be one of {list(TRAIN_PRECISIONS)}, got {value!r}")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16, or a CPU with AMX or
    AVX512-BF16)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported",
                                                        "_is_avx512_bf16_supported")]
        return any(bool(check()) for check in checks if check is not None)
    return device.type == "mps"


_warned: set[str] = set()


def effective_precision(requested: str, device: torch.device, owner: str = "training") -> str:
    """The precision a step on ``device`` will use: ``bf16`` only where it is native."""
    if requested == "bf16" and not native_bf16(device):
        key = f"{owner}:{device.type}"
        if key not in _warned:
            _warned.add(key)
            log.warning("%s: train_precision bf16 asked for, but this %s has no native "
                        "bfloat16 (no AMX/AVX512-BF16); training in float32", owner,
                        device.type.upper())
        return "32"
    return requested


def training_autocast(precision: str, device: torch.device):
    """A context in which a training step runs at ``precision`` (``32``: no autocast)."""
    if precision != "bf16":
        return nullcontext()
    install_cpu_fp32_attention()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


_installed = False


def install_cpu_fp32_attention() -> None:
    """Make HF's ``sdpa`` attention compute in float32 while a CPU autocast is active.

    Idempotent; every other call (another device, or no autocast) goes to HF's own
    function with the same arguments, so results elsewhere are unchanged.
    """
    global _installed
    if _installed:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa_attention(module, query, key, value, attention_mask, *args, **kwargs):
        # Under autocast, query and key leave the rotary embedding in float32 and value in
        # bfloat16; autocast would run the kernel in bfloat16. The output projection that
        # follows casts the float32 result back by autocast's own rule.
        if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast(device_type="cpu", enabled=False):
                return sdpa_attention_forward(module, query.float(), key.float(),
                                              value.float(), attention_mask, *args, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args,
                                      **kwargs)

    AttentionInterface.register("sdpa", sdpa_attention)
    _installed = True
