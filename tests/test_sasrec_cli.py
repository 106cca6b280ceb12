"""SASRec through the real CLI and YAML on an ML-100K slice: fit, pipeline, resume, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SLICE = ["--data.init_args.max_users=120", "--trainer.max_epochs=2",
         "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    run("cli.py", "pipeline", "--config", "configs/ml100k/pipeline.yaml", "--run_dir",
        str(run_dir), "--stages", "sasrec", *SLICE)
    return run_dir


def test_pipeline_writes_metrics_report_logs_and_embeddings(pipeline_run):
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    assert metrics["dataset"] == "ml-100k"
    assert metrics["protocol"]["max_history"] == 20 and metrics["protocol"]["ks"] == [5, 10]
    sas = metrics["stages"]["sasrec"]
    for split in ("valid", "test"):
        assert set(sas[split]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
        assert 0.0 <= sas[split]["ndcg@10"] <= sas[split]["recall@10"] <= 1.0
        assert sas[split]["recall@5"] <= sas[split]["recall@10"]
    assert sas["seconds"] > 0
    # The code and the libraries that made the stage.
    record = json.loads((pipeline_run / "sasrec" / "stage.json").read_text())
    assert record["commit"] and record["packages"]["torch"] == torch.__version__
    assert set(record["packages"]) >= {"transformers", "lightning", "peft"}
    # A slice is marked as such in metrics.json and in the report.
    assert sas["evaluated_users"] == {"valid": 120, "test": 120, "of": 120, "slice": 120,
                                      "partial": True}
    report = (pipeline_run / "report.md").read_text()
    assert "| sasrec | test (slice: first 120 users) |" in report
    for plot in ("sasrec_curves.png", "test_metrics.png"):  # written and linked
        assert (pipeline_run / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{plot})" in report
    assert list((pipeline_run / "logs" / "sasrec").rglob("events.out.tfevents.*"))
    items = torch.load(pipeline_run / "sasrec" / "item_embeddings.pt")
    users = torch.load(pipeline_run / "sasrec" / "user_embeddings.pt")
    assert items.shape == (1682, 64) and users.shape == (120, 64)
    assert torch.isfinite(items).all() and torch.isfinite(users).all()


def test_per_user_ranks_reproduce_the_metrics(pipeline_run):
    import numpy as np

    from datamodules.sequential_data import SequentialDataModule

    dm = SequentialDataModule(max_users=120)
    dm.load()
    raw_ids = [str(dm.dataset.user_ids[int(u)]) for u in dm.split.users]
    record = json.loads((pipeline_run / "sasrec" / "stage.json").read_text())
    users = json.loads((pipeline_run / "sasrec" / "ranks_users.json").read_text())
    assert record["ranks"] == ["ranks_valid.npy", "ranks_test.npy", "ranks_users.json"]
    for split in ("valid", "test"):
        ranks = np.load(pipeline_run / "sasrec" / f"ranks_{split}.npy")
        assert len(ranks) == len(users[split]) == 120 and (ranks >= 0).all()
        assert users[split] == raw_ids                       # raw ids, in split-row order
        assert np.mean(ranks < 10) == pytest.approx(record[split]["recall@10"], abs=1e-6)
        ndcg = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean()
        assert ndcg == pytest.approx(record[split]["ndcg@10"], abs=1e-6)


def test_user_embeddings_encode_training_history_only(pipeline_run):
    from datamodules.base import pad_left
    from datamodules.sequential_data import SequentialDataModule
    from lightning_modules.sasrec import SASRec

    model = SASRec.load_from_checkpoint(pipeline_run / "sasrec" / "checkpoints" / "best.ckpt")
    model.eval()
    dm = SequentialDataModule(max_users=120)
    dm.load()
    users = torch.load(pipeline_run / "sasrec" / "user_embeddings.pt")
    row = 3
    user = int(dm.split.users[row])
    train_only = pad_left([dm.split.history(row, "valid", 20) + 1], 20, 0)
    with_valid = pad_left([dm.split.history(row, "test", 20) + 1], 20, 0)
    assert torch.allclose(users[user], model.encode_users(train_only)[0], atol=1e-5)
    assert not torch.allclose(users[user], model.encode_users(with_valid)[0], atol=1e-3)
    # The states after the later splits' histories, for the tokenizer's refreshed user SCIDs.
    later = torch.load(pipeline_run / "sasrec" / "user_embeddings_test.pt")
    assert torch.allclose(later[user], model.encode_users(with_valid)[0], atol=1e-5)
    everything = np.append(dm.split.history(row, "test"), dm.split.test_target[row])
    last = torch.load(pipeline_run / "sasrec" / "user_embeddings_predict.pt")
    assert torch.allclose(last[user], model.encode_users(
        pad_left([everything[-20:] + 1], 20, 0))[0], atol=1e-5)
    # The state before each training target, for causal user SCIDs in training prompts.
    blob = torch.load(pipeline_run / "sasrec" / "user_prefix_embeddings.pt")
    seq = dm.split.train_items[row]
    assert int(blob["offsets"].diff()[user]) == len(seq) - 1
    for p in (1, len(seq) - 1):
        expected = model.encode_users(pad_left([seq[max(0, p - 20):p] + 1], 20, 0))[0]
        assert torch.allclose(blob["states"][int(blob["offsets"][user]) + p - 1], expected,
                              atol=1e-5)


def test_pipeline_skips_complete_stages(pipeline_run):
    marker = pipeline_run / "sasrec" / "stage.json"
    before = marker.stat().st_mtime_ns
    proc = run("cli.py", "pipeline", "--config", "configs/ml100k/pipeline.yaml", "--run_dir",
               str(pipeline_run), "--stages", "sasrec", *SLICE)
    assert "stage sasrec: complete" in proc.stderr
    assert marker.stat().st_mtime_ns == before
    assert "args parameter" not in proc.stderr  # LightningCLI sees the stage's args only


def test_pipeline_reuses_equal_stages_and_reruns_changed_ones(pipeline_run, tmp_path):
    import shutil

    import numpy as np

    first = json.loads((pipeline_run / "sasrec" / "stage.json").read_text())
    assert first["stage_fingerprint"] and first["upstream"] == {}
    # The same stage into another run directory: copied from the first run, not recomputed.
    fresh = tmp_path / "fresh"
    proc = run("cli.py", "pipeline", "--config", "configs/ml100k/pipeline.yaml", "--run_dir",
               str(fresh), "--stages", "sasrec", "--reuse", str(pipeline_run), *SLICE)
    assert "copied, not recomputed" in proc.stderr and "running" not in proc.stderr
    copied = json.loads((fresh / "sasrec" / "stage.json").read_text())
    assert copied["reused_from"] == str(pipeline_run / "sasrec")
    assert copied["stage_fingerprint"] == first["stage_fingerprint"]
    assert np.array_equal(np.load(fresh / "sasrec" / "ranks_test.npy"),
                          np.load(pipeline_run / "sasrec" / "ranks_test.npy"))
    assert json.loads((fresh / "metrics.json").read_text())["stages"]["sasrec"]
    # A changed option re-runs the complete stage instead of skipping it.
    changed = tmp_path / "changed"
    shutil.copytree(pipeline_run, changed)
    proc = run("cli.py", "pipeline", "--config", "configs/ml100k/pipeline.yaml", "--run_dir",
               str(changed), "--stages", "sasrec", "--reuse", str(pipeline_run), *SLICE,
               "--model.init_args.hidden_size=16")
    assert "config, seed or upstream changed" in proc.stderr and "copied" not in proc.stderr
    # Output to a file: plain progress lines; no faiss import probing, no logger advert.
    assert "sasrec: epoch 2/2 done, step" in proc.stderr and "rows/s" in proc.stderr
    assert "swigfaiss" not in proc.stderr and "litlogger" not in proc.stderr
    rerun = json.loads((changed / "sasrec" / "stage.json").read_text())
    assert rerun["stage_fingerprint"] != first["stage_fingerprint"]
    assert rerun["embedding_dim"] == 16 and "reused_from" not in rerun
    listed = {a["path"] for a in rerun["artifacts"]}
    assert {"item_embeddings.pt", "ranks_test.npy", "checkpoints/best.ckpt"} <= listed
    # A damaged artifact makes the stage incomplete: the same command re-runs it.
    from lightning_modules.components.artifacts import stage_complete

    emb = changed / "sasrec" / "item_embeddings.pt"
    emb.write_bytes(emb.read_bytes()[:100])
    assert not stage_complete(changed, "sasrec")
    proc = run("cli.py", "pipeline", "--config", "configs/ml100k/pipeline.yaml", "--run_dir",
               str(changed), "--stages", "sasrec", *SLICE, "--model.init_args.hidden_size=16")
    assert f"{emb} has 100 bytes" in proc.stderr and "re-running" in proc.stderr
    assert stage_complete(changed, "sasrec", hashes=True)


def test_ddp_evaluation_matches_single_process(pipeline_run, tmp_path):
    ckpt = str(pipeline_run / "sasrec" / "checkpoints" / "best.ckpt")
    common = ["--config", "configs/ml100k/sasrec.yaml", "--ckpt_path", ckpt,
              "--data.init_args.max_users=120", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
    run("tests/ddp_eval.py", str(tmp_path / "one.json"), *common, "--trainer.devices=1")
    run("tests/ddp_eval.py", str(tmp_path / "two.json"), *common, "--trainer.devices=2",
        "--trainer.strategy=ddp")
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["metrics"].keys() == two["metrics"].keys()
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_single_stage_fit_through_yaml_exports_stage(tmp_path):
    run("cli.py", "fit", "--config", "configs/ml100k/sasrec.yaml",
        f"--model.init_args.run_dir={tmp_path}", f"--data.init_args.run_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        "--data.init_args.max_users=60", "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false")
    record = json.loads((tmp_path / "sasrec" / "stage.json").read_text())
    assert record["num_items"] == 1682 and record["num_users"] == 60
    assert "ndcg@10" in record["valid"]


def test_pipeline_rejects_unknown_flags_and_stages(tmp_path):
    bad = subprocess.run([sys.executable, "cli.py", "pipeline", "--config",
                          "configs/ml100k/pipeline.yaml", "--run_dir", str(tmp_path),
                          "--stages", "nonexistent"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "nonexistent" in bad.stderr
    bad = subprocess.run([sys.executable, "cli.py", "pipeline", "--config",
                          "configs/ml100k/pipeline.yaml", "--bogus", "1"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--bogus" in bad.stderr


def test_test_subcommand_with_ckpt_path_honours_overrides_and_keeps_the_run(pipeline_run):
    marker = pipeline_run / "sasrec" / "stage.json"
    before = marker.read_bytes()
    ckpt = str(pipeline_run / "sasrec" / "checkpoints" / "best.ckpt")
    proc = run("cli.py", "test", "--config", "configs/ml100k/sasrec.yaml", "--ckpt_path", ckpt,
               f"--model.init_args.run_dir={pipeline_run}", "--model.init_args.ks=[1,3]",
               "--data.init_args.max_users=50", "--trainer.logger=false", *SLICE[1:])
    # The checkpoint's hyperparameters said ks [5, 10]; the command line wins.
    assert "test/recall@3" in proc.stdout and "test/recall@10" not in proc.stdout
    assert marker.read_bytes() == before
