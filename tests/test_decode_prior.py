"""``decode_prior``: beam search ranks items by ``log p(item | prompt) - alpha * log prior``,
the prior being the items' training counts; the counts travel with the exported model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.finished_runs import FLAGS, files_of, finished_run, run_python
from tests.test_sft_stage import TINY, make_dm, scid_map, trainer


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory):
    """A few steps of a tiny sft model that decodes with a prior (alpha 0.5)."""
    import lightning as L

    from lightning_modules.generative_recommender import GenerativeRecommender

    run_dir = tmp_path_factory.mktemp("prior")
    scid_map().save(run_dir / "tokenizer")
    L.seed_everything(0, verbose=False)
    dm = make_dm(run_dir)
    model = GenerativeRecommender(run_dir=str(run_dir), backbone=TINY, decode_prior=0.5,
                                  export_on_fit_end=True)
    trainer(limit_train_batches=2, limit_val_batches=1).fit(model, datamodule=dm)
    return run_dir, dm, model


def test_the_prior_is_the_training_counts_and_shifts_the_beam_scores(prior_run):
    _, dm, model = prior_run
    counts = np.bincount(np.concatenate(dm.split.train_items), minlength=dm.split.num_items)
    assert model.prior_counts == counts.tolist()
    prompts = model.build_prompts([0, 1, 2, 3], "valid")
    items, scores = model.recommend(prompts)
    model.decode_prior = 0.0
    try:
        plain_items, plain_scores = model.recommend(prompts, num_beams=model.trie.num_items)
    finally:
        model.decode_prior = 0.5
    # Every returned score is the item's plain log-probability minus 0.5 x its log-prior.
    prior = model.trie.log_prior(counts)
    per_item = sum(prior[lvl][model.trie.prefix_id[lvl + 1]] for lvl in range(3))
    for b in range(items.shape[0]):
        plain = dict(zip(plain_items[b].tolist(), plain_scores[b].tolist()))
        want = torch.tensor([plain[i] - 0.5 * float(per_item[i]) for i in items[b].tolist()])
        torch.testing.assert_close(scores[b], want, atol=1e-4, rtol=1e-5)


def test_the_exported_model_and_the_server_decode_with_the_same_prior(prior_run):
    from lightning_modules.generative_recommender import load_generative_recommender
    from lightning_modules.recommender import Recommender

    run_dir, _, model = prior_run
    info = json.loads((run_dir / "sft" / "hf" / "align3gr_sft.json").read_text())
    assert info["decode_prior"] == 0.5 and info["prior_counts"] == model.prior_counts
    loaded = load_generative_recommender(run_dir)
    assert loaded.decode_prior == 0.5 and loaded.prior_counts == model.prior_counts
    for a, b in zip(loaded.node_bias(), model.node_bias()):
        torch.testing.assert_close(a, b)
    # Serving needs no data: the counts came with the model.
    rec = Recommender.from_pretrained(run_dir / "sft" / "hf")
    assert rec.model.decode_prior == 0.5 and rec.model.node_bias() is not None


def test_bad_alpha_and_missing_counts_are_clear_errors(prior_run):
    from lightning_modules.generative_recommender import GenerativeRecommender

    for bad in (-10.0, 10.0, "0.2"):
        with pytest.raises(ValueError, match="decode_prior must be a number in"):
            GenerativeRecommender(backbone=TINY, decode_prior=bad)
    with pytest.raises(RuntimeError, match="needs the items' training counts"):
        GenerativeRecommender(backbone=TINY, decode_prior=0.3).node_bias()
    with pytest.raises(ValueError, match="prior counts: 3 values for 1682 items"):
        prior_run[2].set_prior_counts([1, 2, 3])


def test_eval_decode_prior_reevaluates_a_finished_run(tmp_path):
    flags = [*FLAGS, "--trainer.max_epochs=1"]
    source, before = finished_run(tmp_path / "runs", flags)
    proc = run_python("bench/eval_decode_prior.py", "--pipeline", "configs/ml100k/pipeline.yaml",
                      "--runs", str(tmp_path / "runs"), "--seeds", "0", "--alphas", "0.5",
                      "--check", "--out", str(tmp_path / "out"), "--json",
                      str(tmp_path / "r.json"), *flags)
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["table"]) == {"0.5"}
    row = result["table"]["0.5"]
    assert set(row["paired"]) == {"valid ndcg@10", "test ndcg@10", "test recall@10"}
    seed = json.loads((tmp_path / "out" / "seed0" / "result_sft.json").read_text())
    # The stage's own alpha (the ML-100K default) reproduced its validation (the script
    # checks); alpha 0.5 decodes otherwise, and its means are those of its ranks.
    assert result["own_alpha"] == seed["own_alpha"] == -0.1
    assert set(seed["alphas"]) == {"-0.1", "0.5"}
    assert row["means"]["valid ndcg@10"] == pytest.approx(
        seed["alphas"]["0.5"]["valid"]["ndcg@10"], abs=1e-6)
    assert "| 0.5 |" in proc.stdout and "| -0.1 |" in proc.stdout
    # The stage's own alpha is the reference, not a candidate.
    proc = run_python("bench/eval_decode_prior.py", "--pipeline", "configs/ml100k/pipeline.yaml",
                      "--runs", str(tmp_path / "runs"), "--seeds", "0", "--alphas=-0.1",
                      "--out", str(tmp_path / "o2"), *flags, check=False)
    assert proc.returncode == 2 and "its own ranks are the reference" in proc.stderr
    # The original run is only read.
    assert before == files_of(source)


def test_prior_false_gives_the_models_own_beams(prior_run):
    """Self-play asks for the policy's own beams (``prior=False``): the plain search."""
    _, _, model = prior_run
    prompts = model.build_prompts([0, 1], "valid")
    own = model.recommend(prompts, prior=False)
    model.decode_prior = 0.0
    try:
        plain = model.recommend(prompts)
    finally:
        model.decode_prior = 0.5
    assert torch.equal(own[0], plain[0]) and torch.equal(own[1], plain[1])
    assert not torch.equal(model.recommend(prompts)[1], plain[1])
