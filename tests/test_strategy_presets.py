"""Every strategy preset composes with every stage config into a valid LightningCLI config
(parsed and resolved: class paths, layer classes, options), and DDP instantiates on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import Align3CLI

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.name for p in (ROOT / "configs" / "strategy").glob("*.yaml"))
STAGES = ["sasrec", "tokenizer", "sft", "dpo"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_stage(preset, stage, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = Align3CLI(args=["--config", f"configs/ml100k/{stage}.yaml", "--config",
                          f"configs/strategy/{preset}", f"--model.init_args.run_dir={tmp_path}",
                          f"--data.init_args.run_dir={tmp_path}"], run=False, parse_only=True)
    strategy = cli.config["trainer"]["strategy"]
    if preset.startswith("deepspeed"):
        assert strategy == f"deepspeed_stage_{preset[-6]}"
        return
    init = strategy["init_args"]
    if preset.startswith("fsdp"):
        assert strategy["class_path"].endswith("FSDPStrategy")
        assert any("LlamaDecoderLayer" in str(c) for c in init["auto_wrap_policy"])
        assert init["activation_checkpointing_policy"]
    else:
        assert strategy["class_path"].endswith("DDPStrategy")


def test_fsdp_wrap_classes_import():
    import importlib

    import yaml

    spec = yaml.safe_load((ROOT / "configs" / "strategy" / "fsdp.yaml").read_text())
    for path in spec["trainer"]["strategy"]["init_args"]["auto_wrap_policy"]:
        module, _, name = path.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type)


def test_ddp_preset_instantiates_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = Align3CLI(args=["--config", "configs/ml100k/sasrec.yaml", "--config",
                          "configs/strategy/ddp.yaml", "--trainer.accelerator=cpu",
                          "--trainer.devices=2", "--trainer.logger=false",
                          f"--model.init_args.run_dir={tmp_path}"], run=False)
    assert type(cli.trainer.strategy).__name__ == "DDPStrategy"
    assert cli.trainer.num_devices == 2


# Lightning refuses FSDP (and DeepSpeed) without CUDA ("The strategy `fsdp` requires a GPU
# accelerator"), so the sharded presets run end to end only on a GPU machine: `pytest -m gpu`.
requires_cuda = pytest.mark.skipif(
    not __import__("torch").cuda.is_available(),
    reason="FSDP/DeepSpeed need CUDA (Lightning refuses them with accelerator=cpu)")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("preset", ["fsdp_lora.yaml", "fsdp.yaml", "ddp.yaml"])
def test_sft_and_dpo_train_under_the_preset_and_their_exports_load(preset, tmp_path):
    import json
    import os
    import subprocess
    import sys

    import torch

    from lightning_modules.recommender import Recommender

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    slice_ = ["--data.init_args.max_users=40", "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=4", "--trainer.enable_progress_bar=false"]

    def pipeline(*args):
        proc = subprocess.run([sys.executable, "cli.py", "pipeline", "--config",
                               "configs/ml100k/pipeline.yaml", "--run_dir", str(tmp_path),
                               *slice_, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    pipeline("--stages", "sasrec,tokenizer", "--trainer.accelerator=cpu")
    pipeline("--stages", "sft,dpo", "--stage_config", f"configs/strategy/{preset}",
             "--trainer.accelerator=gpu", f"--trainer.devices={min(2, torch.cuda.device_count())}")
    for stage in ("sft", "dpo"):
        record = json.loads((tmp_path / stage / "stage.json").read_text())
        assert 0.0 <= record["test"]["ndcg@10"] <= 1.0, record
    rec = Recommender.from_pretrained(tmp_path / "dpo" / "hf")
    assert len(rec.recommend(history=["50", "172", "133"], k=5)) == 5
