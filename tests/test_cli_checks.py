"""The command line's own checks: the top-level help, pipeline YAML keys, data options."""

from __future__ import annotations

import json

import pytest

from datamodules.sequential_data import SequentialDataModule


def test_top_level_help_lists_every_subcommand(capsys):
    from cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict", "pipeline"):
        assert f"\n  {sub} " in out


@pytest.mark.parametrize("kwargs, option", [({"batch_size": 0}, "batch_size"),
                                            ({"eval_batch_size": 0}, "eval_batch_size"),
                                            ({"max_users": 0}, "max_users"),
                                            ({"max_history": 0}, "max_history")])
def test_data_options_are_checked_up_front(kwargs, option):
    with pytest.raises(ValueError, match=f"data.{option}"):
        SequentialDataModule(**kwargs)


def test_pipeline_yaml_rejects_unknown_keys(tmp_path, capsys):
    from cli import pipeline

    bad = tmp_path / "p.yaml"
    bad.write_text("overide: []\nstages:\n  - {name: sasrec, config: configs/ml100k/sasrec.yaml}\n")
    with pytest.raises(SystemExit):
        pipeline(["--config", str(bad), "--run_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "unknown key(s) ['overide']" in err and str(bad) in err
    bad.write_text("stages:\n  - {name: sasrec, config: configs/ml100k/sasrec.yaml, "
                   "overides: []}\n")
    with pytest.raises(SystemExit):
        pipeline(["--config", str(bad), "--run_dir", str(tmp_path / "run")])
    assert "stage 'sasrec' has unknown key(s) ['overides']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_stage_fingerprint_ignores_the_run_directory_and_follows_seed_and_upstream(tmp_path):
    from cli import resolved_stage_config, stage_fingerprint

    args = ("sft", "configs/ml100k/sft.yaml")
    a = stage_fingerprint(*args, tmp_path / "a", ["--seed_everything=1"], {"tokenizer": "t1"})
    b = stage_fingerprint(*args, tmp_path / "b", ["--seed_everything=1"], {"tokenizer": "t1"})
    assert a == b and a["upstream"] == {"tokenizer": "t1"}
    seed = stage_fingerprint(*args, tmp_path / "a", ["--seed_everything=2"], {"tokenizer": "t1"})
    up = stage_fingerprint(*args, tmp_path / "a", ["--seed_everything=1"], {"tokenizer": "t2"})
    opt = stage_fingerprint(*args, tmp_path / "a", ["--seed_everything=1",
                                                    "--model.init_args.lr=0.1"],
                            {"tokenizer": "t1"})
    assert len({a["stage_fingerprint"], seed["stage_fingerprint"], up["stage_fingerprint"],
                opt["stage_fingerprint"]}) == 4
    resolved = resolved_stage_config(*args, tmp_path / "a", [])
    assert resolved["model"]["init_args"]["run_dir"] == "<run_dir>"
    assert resolved["trainer"]["default_root_dir"] == "<run_dir>/sft"
    assert "config" not in resolved


def test_a_later_option_at_its_neutral_value_keeps_earlier_fingerprints(tmp_path):
    """train_precision=32 computes what the stage computed before the option existed, so
    stages made then are still found by --reuse; bf16 is another computation."""
    from cli import resolved_stage_config, stage_fingerprint

    args = ("sft", "configs/ml100k/sft.yaml", tmp_path / "a")
    fp = {p: stage_fingerprint(*args, [f"--model.init_args.train_precision={p}"],
                               {"tokenizer": "t1"})["stage_fingerprint"]
          for p in ("32", "bf16")}
    assert fp["32"] != fp["bf16"]
    assert "train_precision" not in resolved_stage_config(
        *args, ["--model.init_args.train_precision=32"])["model"]["init_args"]
    assert resolved_stage_config(*args, ["--model.init_args.train_precision=bf16"])[
        "model"]["init_args"]["train_precision"] == "bf16"
    # the same for a data option: collaborative_smoothing=0 is the tokenizer before it
    tok = ("tokenizer", "configs/ml100k/tokenizer.yaml", tmp_path / "a")
    fp = {k: stage_fingerprint(*tok, [f"--data.init_args.collaborative_smoothing={k}"],
                               {"sasrec": "s1"})["stage_fingerprint"] for k in ("0", "3")}
    assert fp["0"] == stage_fingerprint(*tok, [], {"sasrec": "s1"})["stage_fingerprint"]
    assert fp["0"] != fp["3"]
    assert "collaborative_smoothing" not in resolved_stage_config(*tok, [])["data"]["init_args"]


def test_find_and_copy_stage(tmp_path):
    from lightning_modules.components.artifacts import (
        copy_stage,
        find_stage,
        mark_stage_complete,
    )

    src = tmp_path / "exp" / "runs" / "a" / "seed0"
    (src / "sft" / "hf").mkdir(parents=True)
    (src / "sft" / "hf" / "model.bin").write_bytes(b"weights")
    mark_stage_complete(src, "sft", {"stage_fingerprint": "f1", "test": {"ndcg@10": 0.1}})
    (tmp_path / "exp" / "bad" / "sft").mkdir(parents=True)
    (tmp_path / "exp" / "bad" / "sft" / "stage.json").write_text("{truncated")
    assert find_stage([tmp_path / "exp"], "sft", "f2") is None
    assert find_stage([tmp_path / "missing", tmp_path / "exp"], "sft", "f1") == src / "sft"
    assert find_stage([tmp_path / "exp"], "dpo", "f1") is None
    dest = tmp_path / "new" / "sft"
    (dest / "stale").mkdir(parents=True)  # an incomplete earlier attempt is replaced
    copy_stage(src / "sft", dest)
    assert (dest / "hf" / "model.bin").read_bytes() == b"weights"
    assert not (dest / "stale").exists()
    record = json.loads((dest / "stage.json").read_text())
    assert record["reused_from"] == str(src / "sft") and record["test"] == {"ndcg@10": 0.1}


@pytest.mark.parametrize("flags, message", [
    (["--config", "configs/ml100k/sasrec.yaml", "--data.init_args.batch_size=0"],
     "error: data.batch_size must be an integer >= 1, got 0"),
    (["--config", "configs/ml100k/sasrec.yaml", "--data.init_args.max_users=0"],
     "error: data.max_users must be an integer >= 1 or null, got 0"),
    (["--config", "configs/ml100k/sft.yaml", "--model.init_args.num_beams=5"],
     "error: num_beams (5) must be >= max(ks) (10)"),
])
def test_refused_options_end_the_command_with_their_message(flags, message):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "cli.py", "fit", *flags, "--trainer.logger=false"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == message
    assert "Given value" not in proc.stderr and "Traceback" not in proc.stderr


def test_the_dataset_block_configures_every_stage(tmp_path, capsys):
    from cli import pipeline

    spec = tmp_path / "p.yaml"
    spec.write_text("dataset: {name: ml-100k, kcore: 20}\n"
                    "stages:\n  - {name: popular, config: configs/ml100k/popular.yaml}\n")
    run = tmp_path / "run"
    assert pipeline(["--config", str(spec), "--run_dir", str(run),
                     "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]) == 0
    record = json.loads((run / "popular" / "stage.json").read_text())
    assert record["num_items"] < 1682  # the 20-core filter of the block reached the stage
    assert json.loads((run / "metrics.json").read_text())["dataset"] == "ml-100k"
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {name: x, folder: y}\n"
                   "stages:\n  - {name: popular, config: configs/ml100k/popular.yaml}\n")
    with pytest.raises(SystemExit):
        pipeline(["--config", str(bad)])
    assert "dataset has unknown key(s) ['folder']" in capsys.readouterr().err


def test_upstream_is_what_a_stage_reads(tmp_path):
    from cli import stage_fingerprint

    up = {"popular": "p1", "sasrec": "s1", "tokenizer": "t1", "sft": "f1"}
    sasrec = stage_fingerprint("sasrec", "configs/ml100k/sasrec.yaml", tmp_path, [],
                               {"popular": "p1"})
    assert sasrec["upstream"] == {}  # a popular stage before it changes nothing
    tok = stage_fingerprint("tokenizer", "configs/ml100k/tokenizer.yaml", tmp_path, [], up)
    assert tok["upstream"] == {"sasrec": "s1"}
    dpo = stage_fingerprint("dpo", "configs/ml100k/dpo.yaml", tmp_path, [], up)
    assert dpo["upstream"] == {"tokenizer": "t1", "sft": "f1"}


def test_a_stage_whose_artifacts_changed_gets_another_fingerprint(tmp_path, monkeypatch):
    """A class's ``artifacts_version`` enters its stage's fingerprint: stages made by a version
    that wrote other artifacts are recomputed, not taken as complete."""
    from cli import stage_fingerprint
    from lightning_modules.sasrec import SASRec

    def fp():
        return stage_fingerprint("sasrec", "configs/ml100k/sasrec.yaml", tmp_path, [],
                                 {})["stage_fingerprint"]

    now = fp()
    monkeypatch.setattr(SASRec, "artifacts_version", SASRec.artifacts_version + 1)
    later = fp()
    monkeypatch.delattr(SASRec, "artifacts_version")
    assert len({now, later, fp()}) == 3


def test_fingerprint_follows_the_data_files_contents(tmp_path):
    from cli import stage_fingerprint

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "D.inter.json").write_text(json.dumps({"0": [0, 1, 2, 3], "1": [1, 2, 3]}))
    flags = ["--data.init_args.dataset=D", "--data.init_args.source=lcrec_json",
             f"--data.init_args.data_dir={folder}"]
    first = stage_fingerprint("sasrec", "configs/ml100k/sasrec.yaml", tmp_path, flags, {})
    (folder / "D.inter.json").write_text(json.dumps({"0": [0, 1, 2, 3], "1": [3, 2, 1]}))
    edited = stage_fingerprint("sasrec", "configs/ml100k/sasrec.yaml", tmp_path, flags, {})
    assert first["data_digest"] != edited["data_digest"]
    assert first["stage_fingerprint"] != edited["stage_fingerprint"]


def test_patience_is_a_plain_option_that_replaces_the_configs_early_stopping(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from cli import ConfigError, stage_cli

    base = ["--config", "configs/ml100k/sasrec.yaml", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false"]

    def stops(cli):
        return [cb for cb in cli.trainer.callbacks if isinstance(cb, EarlyStopping)]

    assert [s.patience for s in stops(stage_cli(base))] == [10]  # the config's callback
    cli = stage_cli(base + ["--patience=3"])
    (stop,) = stops(cli)
    assert (stop.patience, stop.monitor, stop.mode) == (3, "val/ndcg@10", "max")
    kinds = [type(cb) for cb in cli.trainer.callbacks]
    assert kinds.index(EarlyStopping) < kinds.index(ModelCheckpoint)
    assert stops(stage_cli(base + ["--patience=0"])) == []
    tokenizer = ["--config", "configs/ml100k/tokenizer.yaml", "--trainer.logger=false",
                 f"--trainer.default_root_dir={tmp_path}", "--patience=3"]
    with pytest.raises(ConfigError, match="monitors no metric"):
        stage_cli(tokenizer)
    assert stops(stage_cli(tokenizer, in_pipeline=True)) == []  # a pipeline-wide flag


def test_partial_splits_are_marked():
    import torch

    from cli import evaluated_users
    from lightning_modules.components.report import split_label

    ranks = {"valid": (torch.arange(300), torch.zeros(300)),
             "test": (torch.arange(943), torch.zeros(943))}
    users = evaluated_users(ranks, 943)
    assert users == {"valid": 300, "test": 943, "of": 943, "partial": True}
    assert split_label("valid", users) == "valid (300 of 943 users)"
    assert split_label("test", users) == "test"
    full = evaluated_users({"test": (torch.arange(943), torch.zeros(943))}, 943)
    assert not full["partial"] and split_label("test", full) == "test"
    assert split_label("test", None) == "test"  # older stage.json without the record


def test_report_marks_preference_stages_validated_on_a_sample():
    from lightning_modules.components.report import DEFAULT_PROTOCOL, render_report

    valid = {"recall@5": 0.1, "recall@10": 0.2, "ndcg@5": 0.05, "ndcg@10": 0.1}
    dpo = {"valid": valid, "test": valid,
           "evaluated_users": {"valid": 943, "test": 943, "of": 943, "partial": False},
           "per_stage": {"sp_easy": {"valid": valid, "valid_users": 300},
                         "sp_hard": {"valid": valid, "valid_users": 943}}}
    text = render_report({"dataset": "x", "protocol": dict(DEFAULT_PROTOCOL),
                          "stages": {"dpo": dpo}})
    assert "| sp_easy (300 of 943 users) |" in text and "| sp_hard |" in text
    assert "| dpo | test |" in text  # full rows stay unmarked
