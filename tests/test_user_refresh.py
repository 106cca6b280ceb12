"""User SCIDs refreshed for the later splits: the sasrec stage's user states after the test and
predict histories, the tokenizer's re-encoded codes, the SCID map that carries them and the
prompts that show them (``user_scid_refresh``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datamodules.sequential_data import SequentialDataModule
from lightning_modules.components.artifacts import USER_EMBEDDING_FILES, atomic_torch_save
from lightning_modules.components.scid_map import SCIDMap, load_scid_map
from tests.finished_runs import FLAGS, files_of, finished_run, run_python
from tests.test_sft_stage import TINY, make_dm, scid_map, trainer
from tests.test_tokenizer_stage import USERS, data, fake_sasrec, small_model
from tests.test_tokenizer_stage import trainer as tokenizer_trainer


def refreshed_map() -> SCIDMap:
    base = scid_map()
    users = base.user_codes
    return SCIDMap(base.item_codes, base.item_codebook_sizes, users, base.user_codebook_sizes,
                   user_refreshed_codes={"test": (users + 1) % 12, "predict": (users + 2) % 12})


def test_scid_map_round_trips_refreshed_codes(tmp_path):
    m = refreshed_map()
    back = load_scid_map(m.save(tmp_path))
    for split in ("test", "predict"):
        assert torch.equal(back.user_refreshed_codes[split], m.user_refreshed_codes[split])
    assert back.user_string(3) == m.user_string(3)
    assert back.user_string(3, "test") != back.user_string(3)
    # A map without them (earlier versions) reads as before and says what is missing.
    plain = load_scid_map(scid_map().save(tmp_path / "plain"))
    assert plain.user_refreshed_codes == {}
    with pytest.raises(ValueError, match="no user codes refreshed for 'test'.*rerun the sasrec"):
        plain.user_string(0, "test")


@pytest.mark.parametrize("bad, message", [
    ({"valid": None}, "unknown split 'valid'"),
    ({"test": torch.zeros(5, 3, dtype=torch.long)}, r"shape \(5, 3\), expected"),
    ({"test": torch.full((943, 3), 12)}, "outside the user codebook sizes"),
])
def test_scid_map_rejects_bad_refreshed_codes(bad, message):
    base = scid_map()
    bad = {k: (base.user_codes if v is None else v) for k, v in bad.items()}
    with pytest.raises(ValueError, match=message):
        SCIDMap(base.item_codes, base.item_codebook_sizes, base.user_codes,
                base.user_codebook_sizes, user_refreshed_codes=bad)


def test_user_history_loader_follows_each_split():
    dm = SequentialDataModule(max_users=30, eval_batch_size=64)
    dm.load()
    split, row = dm.split, 4
    user = int(split.users[row])
    expected = {"valid": split.history(row, "valid"), "test": split.history(row, "test"),
                "predict": np.append(split.history(row, "test"), split.test_target[row])}
    for stage, hist in expected.items():
        batch = next(b for b in dm.user_history_loader(stage) if user in b["users"].tolist())
        ids = batch["input_ids"][batch["users"].tolist().index(user)]
        assert ids[ids > 0].tolist() == (hist[-dm.max_history:] + 1).tolist()
    with pytest.raises(ValueError, match="'valid', 'test' or 'predict'"):
        dm.user_history_loader("train")


def _tokenize(run_dir):
    torch.manual_seed(0)
    dm, model = data(run_dir), small_model(run_dir)
    tokenizer_trainer().fit(model, datamodule=dm)
    model.export_artifacts()
    return load_scid_map(run_dir / "tokenizer")


def test_tokenizer_exports_refreshed_user_codes(tmp_path):
    run_dir = fake_sasrec(tmp_path)
    sasrec = run_dir / "sasrec"
    users = torch.load(sasrec / USER_EMBEDDING_FILES["valid"])
    # test: the same states as the training history (codes must equal the user codes);
    # predict: other states (codes must move for some users).
    atomic_torch_save(users.clone(), sasrec / USER_EMBEDDING_FILES["test"])
    g = torch.Generator().manual_seed(1)
    atomic_torch_save(torch.randn(users.shape, generator=g),
                      sasrec / USER_EMBEDDING_FILES["predict"])
    m = _tokenize(run_dir)
    assert set(m.user_refreshed_codes) == {"test", "predict"}
    levels = 3  # small_model's quantizer levels (a de-duplication level may follow)
    test, predict = m.user_refreshed_codes["test"], m.user_refreshed_codes["predict"]
    assert test.shape == predict.shape == m.user_codes.shape == (USERS, m.user_levels)
    assert torch.equal(test[:, :levels], m.user_codes[:, :levels])
    assert (test[:, levels:] == 0).all()
    assert (predict[:, :levels] != m.user_codes[:, :levels]).any(dim=1).float().mean() > 0.3


def test_tokenizer_without_refreshed_states_exports_none(tmp_path):
    m = _tokenize(fake_sasrec(tmp_path))  # a sasrec stage of an earlier version
    assert m.has_users and m.user_refreshed_codes == {}


@pytest.fixture(scope="module")
def refresh_run(tmp_path_factory):
    """A few steps of a tiny sft model over a map with refreshed user codes."""
    import lightning as L

    from lightning_modules.generative_recommender import GenerativeRecommender

    run_dir = tmp_path_factory.mktemp("refresh")
    refreshed_map().save(run_dir / "tokenizer")
    L.seed_everything(0, verbose=False)
    dm = make_dm(run_dir)
    model = GenerativeRecommender(run_dir=str(run_dir), backbone=TINY, user_scid_refresh=True,
                                  export_on_fit_end=True)
    trainer(limit_train_batches=2, limit_val_batches=1).fit(model, datamodule=dm)
    return run_dir, dm, model


def test_test_and_predict_prompts_show_refreshed_user_scids(refresh_run):
    _, dm, model = refresh_run
    m, rows = dm.prompts.scid_map, [0, 1, 2]
    users = [int(dm.split.users[r]) for r in rows]
    expected = {"valid": None, "test": "test", "predict": "predict"}
    for stage, refreshed_for in expected.items():
        for prompt, user in zip(model.build_prompts(rows, stage), users):
            assert m.user_string(user, refreshed_for) in prompt, stage
    model.user_scid_refresh = False
    try:
        for prompt, user in zip(model.build_prompts(rows, "test"), users):
            assert m.user_string(user) in prompt and m.user_string(user, "test") not in prompt
    finally:
        model.user_scid_refresh = True


def test_the_exported_model_keeps_refreshing(refresh_run):
    from lightning_modules.generative_recommender import load_generative_recommender
    from lightning_modules.recommender import Recommender

    run_dir, dm, _ = refresh_run
    loaded = load_generative_recommender(run_dir)
    assert loaded.user_scid_refresh
    assert loaded.scid_map.user_refreshed_codes.keys() == {"test", "predict"}
    # Serving a known user shows the SCID of everything known of it.
    rec = Recommender.from_pretrained(run_dir / "sft" / "hf")
    user = int(dm.split.users[0])
    prompt = rec._prompt([1, 2, 3], user)
    assert loaded.scid_map.user_string(user, "predict") in prompt


def test_refresh_without_refreshed_codes_is_a_clear_error(tmp_path):
    import lightning as L

    from lightning_modules.generative_recommender import GenerativeRecommender

    scid_map().save(tmp_path / "tokenizer")
    L.seed_everything(0, verbose=False)
    model = GenerativeRecommender(run_dir=str(tmp_path), backbone=TINY, user_scid_refresh=True)
    with pytest.raises(ValueError, match="user_scid_refresh=true needs user SCIDs refreshed"):
        trainer(limit_train_batches=1, limit_val_batches=1).fit(model,
                                                                datamodule=make_dm(tmp_path))


def test_eval_user_refresh_retests_a_finished_run_both_ways(tmp_path):
    flags = [*FLAGS, "--trainer.max_epochs=2"]
    source, before = finished_run(tmp_path / "runs", flags)
    out = tmp_path / "out"
    proc = run_python("bench/eval_user_refresh.py", "--pipeline", "configs/ml100k/pipeline.yaml",
                      "--runs", str(tmp_path / "runs"), "--seeds", "0", "--out", str(out),
                      "--json", str(tmp_path / "r.json"), *flags)
    result = json.loads((tmp_path / "r.json").read_text())
    seed = result["seeds"][0]
    # The shipped config tests with fixed SCIDs; the script reproduced that (it checks).
    recorded = json.loads((source / "sft" / "stage.json").read_text())["test"]
    assert seed["stage_tested"] == "fixed" and seed["fixed"] == recorded
    assert set(result["paired"]) == {"refreshed-fixed", "fixed-sasrec", "refreshed-sasrec"}
    assert "| mean |" in proc.stdout
    # The original run is only read.
    assert before == files_of(source)
