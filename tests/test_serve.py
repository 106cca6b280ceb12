"""The LitServe server over real HTTP on a localhost port: the same top-k as the Recommender,
concurrent requests batched, bad requests answered with a 4xx and the server still alive."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lightning_modules.recommender import Recommender
from tests.dpo_fixtures import make_sft_run

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    hf = make_sft_run(tmp_path_factory.mktemp("serve"), max_users=12, train_batches=2)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "cli.py", "serve", "--model", str(hf), "--port",
                             str(port), "--max_batch_size", "8", "--batch_timeout", "0.05",
                             "--accelerator", "cpu", "--devices", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            out = proc.stdout.read() if proc.poll() is not None else ""
            proc.kill()
            raise RuntimeError(f"server did not come up: {out[-3000:]}")
        time.sleep(0.5)
    yield base, hf
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    # SIGTERM stops the whole server: no LitServe worker process is left behind.
    left = _wait_group_gone(proc.pid, seconds=20)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the server's worker processes outlived its SIGTERM")


def _wait_group_gone(pgid: int, seconds: float) -> bool:
    """Whether processes of group ``pgid`` are still alive after ``seconds``."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.25)
    return True


def test_predict_equals_the_recommender(server):
    base, hf = server
    rec = Recommender.from_pretrained(hf)
    history, user = rec.item_ids[:5], rec.user_ids[0]
    status, body = post(base + "/predict", json.dumps(
        {"history": history, "user": user, "k": 10}).encode())
    assert status == 200
    want = rec.recommend(history, user, k=10)
    assert [i["id"] for i in body["items"]] == [i["id"] for i in want]
    assert [i["title"] for i in body["items"]] == [i["title"] for i in want]
    assert body["items"][0]["score"] == pytest.approx(want[0]["score"], abs=1e-4)


def test_concurrent_requests_each_get_their_own_answer(server):
    base, hf = server
    rec = Recommender.from_pretrained(hf)
    requests = [{"history": rec.item_ids[i:i + 4], "k": 3 + i % 5} for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: post(base + "/predict", json.dumps(r).encode()), requests))
    for req, (status, body) in zip(requests, got):
        assert status == 200 and len(body["items"]) == req["k"]
        want = rec.recommend(req["history"], k=req["k"])
        assert [i["id"] for i in body["items"]] == [i["id"] for i in want]


@pytest.mark.parametrize("body, reason", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"history": ["no-such-item"]}).encode(), "unknown item id"),
    (json.dumps({"history": [], "user": "no-such-user"}).encode(), "unknown user id"),
    (json.dumps({"history": [], "k": 0}).encode(), "'k' must be an integer from 1 to 20"),
    (json.dumps({"history": [], "k": 500}).encode(), "'k' must be an integer"),
    (json.dumps({"history": "50"}).encode(), "history"),
    (json.dumps({"histroy": []}).encode(), "histroy"),
    (json.dumps({"history": [], "k": "3"}).encode(), "k"),
])
def test_bad_requests_get_a_4xx_with_the_reason(server, body, reason):
    base, _ = server
    status, answer = post(base + "/predict", body)
    assert 400 <= status < 500, (status, answer)
    if reason:
        assert reason in json.dumps(answer)
    # The worker survived: a good request still works.
    status, answer = post(base + "/predict", json.dumps({"history": [], "k": 2}).encode())
    assert status == 200 and len(answer["items"]) == 2
