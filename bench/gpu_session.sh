#!/usr/bin/env bash
# Everything a borrowed GPU machine should run, in one go (about 10 minutes on one H100/H200):
# the GPU-only tests of the sharded presets, then the throughput benchmark. Writes its output
# under ${OUT:-runs/gpu_session}/ (the benchmark's table in bench_gpu.md).
#   bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_session}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# 1. sft and dpo of a slice under the fsdp_lora, fsdp and ddp presets, exports loaded back.
timeout 240 python -m pytest -m gpu -x -q tests/test_strategy_presets.py 2>&1 | tail -n 30 \
    | tee "$out/pytest_gpu.txt"
# 2. tokens/s, MFU, peak memory and decoding users/s (LoRA and full fine-tuning).
timeout 300 python bench/bench_gpu.py --steps 10 2>&1 | tee "$out/bench_gpu.md"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    timeout 120 torchrun --nproc_per_node 2 bench/bench_gpu.py --sizes qwen2-0.5b --modes lora \
        2>&1 | tee "$out/bench_gpu_2gpus.md"
fi
