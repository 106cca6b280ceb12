"""Corrupt or foreign artifacts give one error type that names the file, what was expected
and the stage to re-run; never torch's advice to load with weights_only=False."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.artifacts import (
    ArtifactError,
    check_checkpoint,
    mark_stage_complete,
    read_json,
)


def test_truncated_sasrec_embeddings_name_the_file_and_the_stage(tmp_path):
    from datamodules.tokenizer_data import load_collaborative_embeddings

    folder = tmp_path / "sasrec"
    folder.mkdir()
    torch.save(torch.zeros(5, 4), folder / "item_embeddings.pt")
    torch.save(torch.zeros(3, 4), folder / "user_embeddings.pt")
    data = (folder / "item_embeddings.pt").read_bytes()
    mark_stage_complete(tmp_path, "sasrec", {"dataset": "d", "num_items": 5, "num_users": 3})
    (folder / "item_embeddings.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as err:
        load_collaborative_embeddings(str(tmp_path), "d", 5, 3)
    msg = str(err.value)
    assert str(folder / "item_embeddings.pt") in msg and "'sasrec' stage" in msg
    assert "weights_only=False" not in msg and "\n" not in msg


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 10])
def test_garbage_checkpoint_is_named_without_unsafe_advice(tmp_path, content):
    path = tmp_path / "sft" / "checkpoints" / "best.ckpt"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ArtifactError) as err:
        check_checkpoint(path, "sft")
    assert str(path) in str(err.value) and "weights_only=False" not in str(err.value)


def test_cli_rejects_a_garbage_checkpoint_before_lightning_reads_it(tmp_path):
    from cli import Align3CLI

    path = tmp_path / "sasrec" / "checkpoints" / "best.ckpt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match=r"best\.ckpt: cannot read a Lightning checkpoint"
                                            r".*'sasrec' stage"):
        Align3CLI(args=["test", "--config", "configs/ml100k/sasrec.yaml",
                        "--ckpt_path", str(path)])


def test_a_checkpoint_holding_unsafe_objects_is_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    from fractions import Fraction

    torch.save({"state_dict": {}, "obj": Fraction(1, 3)}, path)  # needs full unpickling
    with pytest.raises(ArtifactError, match="outside torch's safe set"):
        check_checkpoint(path)


def test_malformed_scid_map_and_stage_json(tmp_path):
    from lightning_modules.components.scid_map import load_scid_map

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "scid_map.json").write_text('{"items": [[1, 2')
    with pytest.raises(ArtifactError, match=r"scid_map\.json: cannot read the SCID map.*"
                                            r"'tokenizer' stage"):
        load_scid_map(folder)
    (folder / "scid_map.json").write_text('{"unexpected": 1}')
    with pytest.raises(ArtifactError, match="'tokenizer' stage"):
        load_scid_map(folder)
    (folder / "stage.json").write_text('{"trunc')
    with pytest.raises(ArtifactError, match=r"stage\.json: cannot read JSON"):
        read_json(folder / "stage.json")


def test_truncated_safetensors_of_the_sft_export(tmp_path):
    from lightning_modules.generative_recommender import GenerativeRecommender
    from tests.dpo_fixtures import make_sft_run

    hf = make_sft_run(tmp_path / "run", max_users=10, train_batches=1)
    weights = next(hf.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(ArtifactError) as err:
        GenerativeRecommender.from_pretrained_dir(hf)
    msg = str(err.value)
    assert str(hf) in msg and "'sft' stage" in msg and "exported SFT model" in msg
