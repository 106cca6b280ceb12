"""bench/bench_gpu.py runs end to end on CPU with the tiny size (the GPU run is the same code)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_on_cpu():
    proc = subprocess.run([sys.executable, "bench/bench_gpu.py", "--device", "cpu", "--sizes",
                           "tiny", "--steps", "1", "--warmup", "1", "--batch", "2", "--seq",
                           "32", "--decode_batch_sizes", "4", "--decode_batches", "1",
                           "--items", "300"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| tiny | lora |" in proc.stdout and "| tiny | full |" in proc.stdout
    assert "| tiny | 4 |" in proc.stdout
