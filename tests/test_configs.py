"""Shipped configs: pipelines point at existing files, and every ablation composes with its
stage config into a valid LightningCLI configuration (unknown keys would fail to parse)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cli import Align3CLI

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = sorted([*ROOT.glob("configs/*/pipeline.yaml"),
                    *ROOT.glob("configs/ablations/pipeline_*.yaml"),
                    *ROOT.glob("configs/templates/pipeline_*.yaml")])
SFT_ABLATIONS = sorted(p.name for p in ROOT.glob("configs/ablations/sft_*.yaml"))
DPO_ABLATIONS = sorted(p.name for p in ROOT.glob("configs/ablations/dpo_*.yaml"))


def _config_files(path: Path) -> list[str]:
    """Every YAML a pipeline names: stage configs and ``--config`` values in overrides."""
    files = []
    for stage in yaml.safe_load(path.read_text())["stages"]:
        overrides = [str(a) for a in stage.get("overrides", [])]
        files.append(stage["config"])
        files += [value for flag, value in zip(overrides, overrides[1:]) if flag == "--config"]
    return files


def test_every_experiment_yaml_loads_with_existing_pipelines():
    from cli import EXPERIMENT_KEYS, ROW_KEYS

    paths = sorted(ROOT.glob("configs/experiments/*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        spec = yaml.safe_load(path.read_text())
        assert set(spec) <= EXPERIMENT_KEYS, path.name
        names = [r["name"] for r in spec["rows"]]
        assert spec.get("reference", names[0]) in names, path.name
        for row in spec["rows"]:
            assert set(row) <= ROW_KEYS and (ROOT / row["pipeline"]).is_file(), (path, row)
            for flags in (row.get("stage_flags") or {}).values():
                for flag, value in zip(flags, flags[1:]):
                    if flag == "--config":
                        assert (ROOT / value).is_file(), (path.name, value)


def test_every_pipeline_names_existing_configs():
    assert PIPELINES, "no pipeline configs found"
    for path in PIPELINES:
        for value in _config_files(path):
            assert (ROOT / value).is_file(), f"{path.name}: {value} does not exist"


def _composed(stage_config: str, ablation: str, capsys, monkeypatch) -> dict:
    """The config LightningCLI resolves from a stage config with an ablation after it."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        Align3CLI(args=["fit", "--config", stage_config, "--config",
                        f"configs/ablations/{ablation}", "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("ablation", SFT_ABLATIONS)
def test_sft_ablations_compose(ablation, capsys, monkeypatch):
    cfg = _composed("configs/ml100k/sft.yaml", ablation, capsys, monkeypatch)
    assert cfg["model"]["init_args"]["backbone"]["dropout"] == 0.2
    tasks = cfg["data"]["init_args"]["tasks"]
    assert tasks["seqrec"] == 1.0
    if ablation in ("sft_tiger.yaml", "sft_collab.yaml", "sft_user.yaml"):
        assert set(tasks) == {"seqrec"}  # next-item prediction only
        assert cfg["data"]["init_args"]["inject_user"] is (ablation == "sft_user.yaml")


@pytest.mark.parametrize("ablation", DPO_ABLATIONS)
def test_dpo_ablations_compose_into_a_valid_curriculum(ablation, capsys, monkeypatch):
    from lightning_modules.preference_aligner import PreferenceStage

    cfg = _composed("configs/ml100k/dpo.yaml", ablation, capsys, monkeypatch)
    stages = cfg["model"]["init_args"]["stages"]
    assert stages, ablation
    for stage in stages:  # every stage is one the aligner accepts
        PreferenceStage(**stage)
    # The trainer runs the whole curriculum (a smaller max_epochs cuts its last stages).
    assert cfg["trainer"]["max_epochs"] >= sum(s.get("epochs", 1) for s in stages), ablation
    assert cfg["data"]["init_args"]["num_negatives"] == 20  # the rest of the stage config holds


def test_pretrained_backbone_presets_turn_the_tiny_models_dropout_off(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        Align3CLI(args=["fit", "--config", "configs/ml100k/sft.yaml", "--model.init_args.backbone",
                        "configs/backbones/qwen2.5-0.5b.yaml", "--print_config"])
    backbone = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["backbone"]
    assert backbone["name_or_path"] == "Qwen/Qwen2.5-0.5B" and backbone["dropout"] == 0.0


@pytest.mark.parametrize("stage", ["sasrec", "tokenizer", "sft", "dpo"])
def test_beauty_stage_configs_compose_after_the_ml100k_ones(stage, capsys, monkeypatch):
    """configs/beauty/<stage>.yaml holds only keys the stage accepts, and the pipeline's
    dataset block points every stage at the LETTER files."""
    from cli import _dataset_flags

    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load((ROOT / "configs/beauty/pipeline.yaml").read_text())
    entry = next(s for s in spec["stages"] if s["name"] == stage)
    with pytest.raises(SystemExit) as exit_info:
        Align3CLI(args=["fit", "--config", entry["config"], *_dataset_flags(spec["dataset"], {}),
                        *[str(a) for a in entry["overrides"]], "--print_config"])
    assert exit_info.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["dataset"] == "Beauty" and data["source"] == "lcrec_json"
    assert data["data_dir"] == "../shared/data/Beauty"


def _row_stage_commands():
    """(experiment, row, stage, argv) for every row stage that the row's stage_flags change."""
    cases = []
    for path in sorted(ROOT.glob("configs/experiments/*.yaml")):
        for row in yaml.safe_load(path.read_text())["rows"]:
            if row.get("skip") or not row.get("stage_flags"):
                continue
            stages = {s["name"]: s for s in yaml.safe_load(
                (ROOT / row["pipeline"]).read_text())["stages"]}
            for name, flags in row["stage_flags"].items():
                stage = stages[name]
                argv = ["fit", "--config", stage["config"],
                        *[str(a) for a in stage.get("overrides", [])], *[str(f) for f in flags]]
                cases.append(pytest.param(argv, id=f"{path.stem}-{row['name']}-{name}"))
    return cases


@pytest.mark.parametrize("argv", _row_stage_commands())
def test_every_experiment_rows_stage_flags_parse(argv, capsys, monkeypatch):
    """A misspelt option in a row's stage_flags fails here, not hours into an experiment."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        Align3CLI(args=[*argv, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
