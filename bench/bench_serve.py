"""Benchmark: the LitServe server (``cli.py serve``) against the offline Recommender.

Starts ``cli.py serve`` on a localhost port with an exported model, sends ``--requests``
``POST /predict`` requests (each a real user's history from the model's catalogue sample) at
concurrency 1, 8 and 32, and prints requests/s with p50/p99 latency, next to the offline
``Recommender.recommend_batch`` throughput (users/s) at the server's batch size on the same
histories. Prints a markdown table.

    python -m bench.bench_serve --model runs/ml100k/dpo/hf
    python -m bench.bench_serve --model runs/ml100k/sft/hf --run_dir runs/ml100k  # older export

A model exported before ``catalog.json`` existed gets one written beside a copy of it from
``--run_dir``'s data (the sft stage's prompt settings).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def with_catalog(model: Path, run_dir: str | None) -> Path:
    """``model`` itself, or a copy with a catalog.json built from ``run_dir``'s data."""
    from lightning_modules.components.prompts import CATALOG_FILE

    if (model / CATALOG_FILE).exists():
        return model
    if run_dir is None:
        raise SystemExit(f"{model / CATALOG_FILE} not found: pass --run_dir (the run that "
                         "trained it) to build one")
    from datamodules.sft_data import SFTDataModule
    from lightning_modules.components.artifacts import atomic_write_json

    dm = SFTDataModule(run_dir=run_dir)
    dm.setup("fit")
    copy = Path(tempfile.mkdtemp()) / "hf"
    shutil.copytree(model, copy)
    atomic_write_json(copy / CATALOG_FILE, dm.prompts.catalog())
    return copy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> float:
    body = json.dumps(payload).encode()
    start = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        resp.read()
        assert resp.status == 200
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported model folder (RUN/*/hf)")
    parser.add_argument("--run_dir", default=None, help="its run (for an export without "
                                                        "catalog.json)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--history", type=int, default=20, help="items per request history")
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--batch_timeout", type=float, default=0.01)
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()

    import torch

    from lightning_modules.recommender import Recommender

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = with_catalog(Path(args.model), args.run_dir)
    rec = Recommender.from_pretrained(model)
    gen = torch.Generator().manual_seed(0)
    n_items = len(rec.item_ids)
    payloads = [{"history": [rec.item_ids[i] for i in
                             torch.randint(n_items, (args.history,), generator=gen).tolist()],
                 "k": 10} for _ in range(args.requests)]

    rows = []
    batch = args.max_batch_size
    start = time.perf_counter()
    for i in range(0, len(payloads), batch):
        rec.recommend_batch([p["history"] for p in payloads[i:i + batch]], k=10)
    offline = len(payloads) / (time.perf_counter() - start)
    rows.append(("offline recommend_batch", f"batch {batch}", f"{offline:.1f}", "—", "—"))

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "cli.py", "serve", "--model", str(model), "--port",
                             str(port), "--max_batch_size", str(batch), "--batch_timeout",
                             str(args.batch_timeout), "--accelerator", "cpu", "--devices", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        post(url + "/predict", payloads[0])  # warm-up
        for conc in [int(c) for c in args.concurrency.split(",")]:
            start = time.perf_counter()
            with ThreadPoolExecutor(conc) as pool:
                lat = list(pool.map(lambda p: post(url + "/predict", p), payloads))
            wall = time.perf_counter() - start
            lat.sort()
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            rows.append(("server POST /predict", f"concurrency {conc}",
                         f"{len(payloads) / wall:.1f}", f"{statistics.median(lat) * 1e3:.0f}",
                         f"{p99 * 1e3:.0f}"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\nmodel {args.model}: {n_items} items, {args.requests} requests of {args.history} "
          f"history items, k=10, beam 20, max_batch_size {batch}, batch_timeout "
          f"{args.batch_timeout} s, torch threads {torch.get_num_threads()}\n")
    print("| path | load | requests/s (users/s) | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
