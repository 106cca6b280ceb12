"""scid_init: codebook — SCID token embeddings start at the tokenizer's codebook vectors."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.scid_init import load_codebooks
from lightning_modules.generative_recommender import GenerativeRecommender
from tests.test_sft_stage import TINY, make_dm, scid_map

SIZES = (12, 12, 12)


def write_checkpoint(folder, dim: int = 8, sizes=SIZES, seed: int = 0):
    """A tokenizer checkpoint with the state-dict layout of the tokenizer stage."""
    g = torch.Generator().manual_seed(seed)
    state = {f"quantizers.{e}.codebooks.codebooks.{lvl}": torch.randn(k, dim, generator=g)
             for e in ("item", "user") for lvl, k in enumerate(sizes)}
    state["quantizers.item.encoder.0.weight"] = torch.zeros(2, 2)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, folder / "checkpoints" / "tokenizer.ckpt")
    return state


def built(run_dir, scid_init: str) -> GenerativeRecommender:
    dm = make_dm(run_dir, max_users=10, tasks={"seqrec": 1.0})
    model = GenerativeRecommender(run_dir=str(run_dir), backbone=TINY, scid_init=scid_init,
                                  seed=0)
    model._datamodule = lambda: dm  # what a Trainer's configure_model would hand it
    model.configure_model()
    return model


def rows(model, tokens):
    ids = model.tokenizer.convert_tokens_to_ids(tokens)
    return model.model.get_input_embeddings().weight.detach()[ids]


def test_codebook_init_carries_each_levels_geometry_and_leaves_other_rows(tmp_path):
    scid_map(sizes=SIZES).save(tmp_path / "tokenizer")
    state = write_checkpoint(tmp_path / "tokenizer")
    plain, init = built(tmp_path, "random"), built(tmp_path, "codebook")
    emb_plain = plain.model.get_input_embeddings().weight.detach()
    emb_init = init.model.get_input_embeddings().weight.detach()
    assert plain.tokenizer.get_vocab() == init.tokenizer.get_vocab()
    scid = set(init.scid_token_ids)
    other = [i for i in range(emb_plain.shape[0]) if i not in scid]
    assert torch.equal(emb_plain[other], emb_init[other])  # text rows: the model's own init
    for entity, prefix in (("item", "a"), ("user", "u")):
        book = state[f"quantizers.{entity}.codebooks.codebooks.0"]
        got = rows(init, [f"<{prefix}_{c}>" for c in range(SIZES[0])])
        assert not torch.allclose(got, rows(plain, [f"<{prefix}_{c}>" for c in range(12)]))
        # Pairwise distances between codes survive the projection to the model width.
        d_book = torch.pdist(book - book.mean(0))
        d_emb = torch.pdist(got)
        corr = torch.corrcoef(torch.stack([d_book, d_emb]))[0, 1]
        assert corr > 0.7, corr
        # At the scale of the model's own embedding rows.
        ratio = got.std() / emb_plain[other].std()
        assert 0.5 < ratio < 2.0, ratio
    # Same seed, same rows (reproducible); the last level too.
    again = built(tmp_path, "codebook")
    assert torch.equal(again.model.get_input_embeddings().weight, emb_init)


def test_codebook_init_names_what_is_missing_or_mismatched(tmp_path):
    scid_map(sizes=SIZES).save(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer.ckpt.*scid_init"):
        built(tmp_path, "codebook")
    write_checkpoint(tmp_path / "tokenizer", sizes=(12, 16, 12))
    with pytest.raises(ValueError, match="item level 1.*16 codes.*SCID map 12"):
        built(tmp_path, "codebook")
    with pytest.raises(ValueError, match="scid_init must be one of"):
        GenerativeRecommender(scid_init="pca")


def test_load_codebooks_rejects_a_checkpoint_without_item_codebooks(tmp_path):
    torch.save({"state_dict": {"encoder.weight": torch.zeros(1)}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="x.ckpt: no item codebooks"):
        load_codebooks(tmp_path / "x.ckpt")
