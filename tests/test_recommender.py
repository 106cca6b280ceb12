"""The Recommender API on an exported slice model: the same top-k as the evaluation path,
raw ids in and out, clear errors for unknown ids."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_modules.recommender import Recommender
from tests.dpo_fixtures import data_kwargs, make_sft_run

MAX_USERS = 12


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rec")
    hf = make_sft_run(run_dir, max_users=MAX_USERS, train_batches=2)
    return run_dir, hf


def test_recommend_matches_the_models_own_prediction(exported):
    from datamodules.sft_data import SFTDataModule
    from lightning_modules.generative_recommender import GenerativeRecommender

    run_dir, hf = exported
    rec = Recommender.from_pretrained(hf)
    dm = SFTDataModule(**data_kwargs(run_dir, MAX_USERS))
    model = GenerativeRecommender.from_pretrained_dir(hf, trainable=False)
    model.attach_data(dm)
    split, ds = dm.split, dm.dataset
    rows = list(range(4))
    prompts = model.build_prompts(rows, "predict")
    histories, users = [], []
    for r in rows:
        items = np.append(split.history(r, "test", None), split.test_target[r])
        histories.append([ds.item_ids[i] for i in items])
        users.append(ds.user_ids[int(split.users[r])])
    expected, _ = model.recommend(prompts, [[ds.item_ids.index(h) for h in hist]
                                            for hist in histories], 20)
    got = rec.recommend_batch(histories, users, k=10)
    for want, out, hist in zip(expected.tolist(), got, histories):
        assert [o["id"] for o in out] == [ds.item_ids[i] for i in want if i >= 0][:10]
        assert not set(o["id"] for o in out) & set(hist)  # history excluded
        assert all(o["title"] for o in out)
        scores = [o["score"] for o in out]
        assert scores == sorted(scores, reverse=True)
    one = rec.recommend(histories[0], users[0], k=3)
    assert [o["id"] for o in one] == [o["id"] for o in got[0][:3]]


def test_unknown_ids_and_bad_k_are_clear_errors(exported):
    _, hf = exported
    rec = Recommender.from_pretrained(hf)
    with pytest.raises(KeyError, match=r"unknown item id\(s\) \['nope', 'x'\]"):
        rec.recommend(["nope", rec.item_ids[0], "x"])
    with pytest.raises(KeyError, match="unknown user id 'ghost'"):
        rec.recommend([rec.item_ids[0]], user="ghost")
    with pytest.raises(ValueError, match="k must be between 1 and the beam width 20"):
        rec.recommend([rec.item_ids[0]], k=21)
    # Without a user, from the history alone; without any history, the prefix alone.
    assert len(rec.recommend([rec.item_ids[0]], k=5)) == 5
    assert len(rec.recommend([], k=5)) == 5


def test_a_folder_without_catalog_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"catalog\.json: not found; expected an "
                                                r"exported model folder"):
        Recommender.from_pretrained(tmp_path)
