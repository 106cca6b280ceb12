"""GPU throughput benchmark: SFT training tokens/s, model FLOPs utilisation (MFU) and peak
memory for Qwen2-0.5B/1.5B-shaped and Llama-2-7B-shaped models (random weights built from
configs; no hub), and trie-constrained decoding users/s at batch 64 and 256.

    python bench/bench_gpu.py                          # one GPU: every size, LoRA and full
    python bench/bench_gpu.py --sizes qwen2-0.5b --modes lora --steps 20
    torchrun --nproc_per_node 2 bench/bench_gpu.py --sizes qwen2-0.5b   # 2 GPUs (DDP)
    python bench/bench_gpu.py --device cpu --sizes tiny --steps 2 --decode_batches 4  # smoke

Training runs the framework's loss (LM head on labelled positions only, as in the sft stage)
on random rows of ``--seq`` tokens with the last 20% labelled, bf16 autocast, AdamW, LoRA via
peft (r 8 on q/k/v/o/gate/up/down, SCID-sized vocabulary). MFU = achieved model FLOPs /
peak bf16 FLOPs of the device, with model FLOPs per token = 6N (full fine-tuning) or 4N
(LoRA: no weight gradients of the frozen base), N = non-embedding parameters, plus the
attention term 12 * layers * hidden * seq (x 2/3 for LoRA). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # name: (arch, hidden, layers, heads, kv_heads, intermediate, vocab)
    "qwen2-0.5b": ("qwen2", 896, 24, 14, 2, 4864, 151_936),
    "qwen2-1.5b": ("qwen2", 1536, 28, 12, 2, 8960, 151_936),
    "llama-2-7b": ("llama", 4096, 32, 32, 32, 11008, 32_000),
    "tiny": ("llama", 128, 2, 4, 4, 384, 2_000),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                    "L4": 121.0}
SCID_TOKENS = 4 * 256  # added item-code tokens (4 levels x 256 codes)


def build(size: str, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, hidden, layers, heads, kv, inter, vocab = SIZES[size]
    cfg = AutoConfig.for_model(arch, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv,
                               intermediate_size=inter, vocab_size=vocab + SCID_TOKENS,
                               max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model, cfg


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if "embed_tokens" not in n and "lm_head" not in n)


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def train_throughput(size, mode, args, device, rank, world):
    from lightning_modules.components.lm_loss import causal_lm_loss

    dtype = torch.bfloat16 if (device.type == "cuda" and mode == "lora") else torch.float32
    model, cfg = build(size, device, dtype)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))
    model.gradient_checkpointing_enable() if args.checkpointing else None
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(rank)
    ids = torch.randint(cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    labels = ids.clone()
    labels[:, : int(args.seq * 0.8)] = -100
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    inner_model = model.module if world > 1 else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if world > 1:  # through the DDP wrapper, so gradients are all-reduced
                loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            else:  # the sft stage's loss: LM head on labelled positions only
                loss = causal_lm_loss(inner_model, ids, None, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    tokens = args.steps * args.batch * args.seq * world
    inner = model.module if world > 1 else model
    n = non_embedding_params(inner)
    per_token = (4 if mode == "lora" else 6) * n + \
        (8 if mode == "lora" else 12) * cfg.num_hidden_layers * cfg.hidden_size * args.seq
    peak = peak_flops(device)
    mfu = None if peak is None else per_token * tokens / seconds / (peak * world)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return tokens / seconds, mfu, memory, n


def decode_throughput(size, batch, args, device):
    from lightning_modules.components.decoding import ItemTrie, constrained_beam_search

    model, cfg = build(size, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.eval()
    base = cfg.vocab_size - SCID_TOKENS
    gen = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(256, (args.items,), generator=gen) + base + 256 * lv
                         for lv in range(3)], dim=1)
    codes = torch.cat([codes, (torch.arange(args.items) % 256 + base + 768).unsqueeze(1)], 1)
    trie = ItemTrie(codes).to(device)
    ids = torch.randint(3, base, (batch, 64), generator=gen).to(device)
    mask = torch.ones_like(ids)
    constrained_beam_search(model, ids, mask, trie, num_beams=20)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.decode_batches):
        constrained_beam_search(model, ids, mask, trie, num_beams=20)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    users = batch * args.decode_batches / (time.perf_counter() - start)
    del model
    return users


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="qwen2-0.5b,qwen2-1.5b,llama-2-7b")
    p.add_argument("--modes", default="lora,full", help="lora and/or full fine-tuning")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--decode_batch_sizes", default="64,256")
    p.add_argument("--decode_batches", type=int, default=4)
    p.add_argument("--items", type=int, default=12_101, help="catalogue size of the trie")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("nccl")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            if size == "llama-2-7b" and mode == "full" and world == 1:
                rows.append((size, mode, "—", "—", "—", "skipped: full 7B needs sharding"))
                continue
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                tps, mfu, mem, n = train_throughput(size, mode, args, device, rank, world)
                rows.append((size, mode, f"{tps:,.0f}", "—" if mfu is None else f"{mfu:.1%}",
                             "—" if mem is None else f"{mem:.1f}", f"N={n / 1e9:.2f}B"))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append((size, mode, "—", "—", "OOM", ""))
    decode = []
    if rank == 0:
        for size in args.sizes.split(","):
            for batch in [int(b) for b in args.decode_batch_sizes.split(",")]:
                try:
                    users = decode_throughput(size, batch, args, device)
                    decode.append((size, batch, f"{users:,.0f}"))
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    decode.append((size, batch, "OOM"))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\n{name} x {world}, torch {torch.__version__}, batch {args.batch} x seq "
              f"{args.seq}, {args.steps} timed steps\n")
        print("| model | fine-tuning | train tokens/s | MFU | peak memory GiB | note |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(str(x) for x in r) + " |")
        print("\n| model | decode batch | users/s (beam 20, trie of "
              f"{args.items:,} items) |\n|---|---|---|")
        for r in decode:
            print("| " + " | ".join(str(x) for x in r) + " |")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
