"""The command line's own checks: the top-level help, pipeline YAML keys, data options."""

from __future__ import annotations

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
