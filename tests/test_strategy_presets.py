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
