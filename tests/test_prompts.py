"""Prompt builders and SFT examples: history truncation, user SCID injection, loss masks,
training data from the training split only."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from datamodules.schema import RecDataset
from datamodules.sft_data import SFTTrainDataset
from datamodules.split import leave_one_out
from lightning_modules.components.prompts import (
    IGNORE_INDEX,
    PromptBuilder,
    default_templates_path,
    encode_prompts,
    encode_segments,
)
from lightning_modules.components.scid_map import SCIDMap
from lightning_modules.components.text_tokenizer import add_scid_tokens, train_text_tokenizer

NUM_ITEMS, NUM_USERS = 40, 6


@pytest.fixture(scope="module")
def data() -> RecDataset:
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(NUM_USERS):
        seq = rng.permutation(NUM_ITEMS)[: 10 + 5 * u]  # 10..35 interactions, no repeats
        users += [u] * len(seq)
        items += list(seq)
    return RecDataset(
        name="toy", item_ids=[str(i + 1) for i in range(NUM_ITEMS)],
        user_ids=[str(u + 1) for u in range(NUM_USERS)], users=np.array(users),
        items=np.array(items), timestamps=np.arange(len(users), dtype=float),
        item_features=[{"title": f"Movie {i}", "year": "1995", "genres": "Drama"}
                       for i in range(NUM_ITEMS)],
        user_features=[{"age": str(20 + u), "gender": "F", "occupation": "writer"}
                       for u in range(NUM_USERS)])


@pytest.fixture(scope="module")
def scid() -> SCIDMap:
    items = torch.tensor([[i // 16, (i // 4) % 4, i % 4] for i in range(NUM_ITEMS)])
    users = torch.tensor([[u % 2, u // 2] for u in range(NUM_USERS)])
    return SCIDMap(items, [3, 4, 4], users, [2, 3])


def builder(data, scid, **kw) -> PromptBuilder:
    return PromptBuilder(data, scid, default_templates_path("ml-100k"), **kw)


@pytest.fixture(scope="module")
def tokenizer(data, scid):
    tok = train_text_tokenizer(builder(data, scid).text_corpus(), vocab_size=300)
    add_scid_tokens(tok, scid.item_vocabulary() + scid.user_vocabulary())
    return tok


def test_history_is_truncated_to_the_most_recent_items(data, scid):
    p = builder(data, scid, max_history=5)
    history = list(range(12))
    for mode in ("sequence", "prompt"):
        p.seqrec_mode = mode
        prompt = p.seqrec_prompt(0, history)
        assert p.history_string(history[-5:]) in prompt
        assert scid.item_string(6) not in prompt  # the 6th most recent item is cut
        assert prompt.count("<a_") == 5


def test_user_scid_injection_on_and_off(data, scid):
    on = builder(data, scid, inject_user=True)
    off = builder(data, scid, inject_user=False)
    for p, expect in ((on, True), (off, False)):
        prompt = p.seqrec_prompt(3, [1, 2, 3])
        assert (scid.user_string(3) in prompt) is expect
        segs = p.sequence_segments(3, [1, 2, 3], first_trained=1)
        assert (scid.user_string(3) in segs[0][0]) is expect
    # Without user codes injection silently turns off (item-only SCID ablation).
    items_only = SCIDMap(scid.item_codes, scid.item_codebook_sizes)
    p = builder(data, items_only, inject_user=True)
    assert "<u_" not in p.seqrec_prompt(3, [1, 2]) and not p.has_task("user2index")
    assert "user SCIDs" in p.missing_for("index2user")
    assert p.missing_for("seqrec") is None and p.missing_for("item2index") is None


def test_skipped_task_names_what_is_missing(data, scid, caplog):
    split = leave_one_out(data)
    items_only = SCIDMap(scid.item_codes, scid.item_codebook_sizes)
    with caplog.at_level("WARNING", logger="datamodules.sft_data"):
        ds = SFTTrainDataset(builder(data, items_only), split,
                             {"seqrec": 1.0, "user2index": 1.0}, "sequence", 5, 20)
    assert "user2index" not in ds.counts
    assert "task user2index skipped: it needs user SCIDs" in caplog.text
    saved = data.item_features
    try:
        data.item_features = None
        assert "item text" in builder(data, scid).missing_for("item2index")
    finally:
        data.item_features = saved


def test_every_task_masks_the_prompt(data, scid, tokenizer):
    p = builder(data, scid)
    rng = random.Random(0)
    examples = [p.seqrec(0, [1, 2, 3], 4, rng), p.item2index(5, rng), p.index2item(5, rng),
                p.user2index(2, rng), p.index2user(2, rng), p.fusionseqrec(1, [3, 4], 7, rng)]
    rows = encode_segments(tokenizer, examples, add_eos=[False, False, True, False, True, False])
    for segs, (ids, labels) in zip(examples, rows):
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(labels)
        response = tokenizer(segs[-1][0], add_special_tokens=False)["input_ids"]
        trained = [t for t in labels if t != IGNORE_INDEX]
        if trained[-1] == tokenizer.eos_token_id and response[-1] != tokenizer.eos_token_id:
            trained = trained[:-1]
        assert trained == response  # loss exactly on the response tokens
        n_prompt = len(ids) - len([t for t in labels if t != IGNORE_INDEX])
        assert all(t == IGNORE_INDEX for t in labels[:n_prompt])
    # SCID responses are exactly one token per code level.
    assert len([t for t in rows[1][1] if t != IGNORE_INDEX]) == scid.item_levels


def test_sequence_form_trains_items_after_the_context(data, scid, tokenizer):
    p = builder(data, scid)
    items = [3, 9, 14, 20]
    (ids, labels), = encode_segments(tokenizer, [p.sequence_segments(1, items, 2)])
    trained = [t for t in labels if t != IGNORE_INDEX]
    expected = tokenizer(scid.item_string(14) + scid.item_string(20),
                         add_special_tokens=False)["input_ids"]
    assert trained == expected
    # The context before item j is exactly the evaluation prompt of history items[:j].
    prompt = encode_prompts(tokenizer, [p.seqrec_prompt(1, items[:2])])["input_ids"][0].tolist()
    assert ids[:len(prompt)] == prompt


def test_eval_prompts_are_left_padded(data, scid, tokenizer):
    p = builder(data, scid)
    enc = encode_prompts(tokenizer, [p.seqrec_prompt(0, [1]), p.seqrec_prompt(0, [1, 2, 3])])
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][:, -1].all()
    assert (enc["input_ids"][enc["attention_mask"] == 0] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("mode", ["sequence", "prompt"])
def test_training_examples_use_training_items_only(data, scid, tokenizer, mode):
    split = leave_one_out(data)
    p = builder(data, scid, max_history=4, seqrec_mode=mode)
    ds = SFTTrainDataset(p, split, {"seqrec": 1.0}, mode, window_min_context=2, max_history=4)
    # Every training target position (1..n-1 of each user's training items) is coverable.
    expected = sum(len(s) - 1 for s in split.train_items)
    if mode == "prompt":
        assert len(ds) == expected
    random.seed(0)
    for i in range(len(ds)):
        segs, _ = ds[i]
        row = ds.specs[i][1][0]
        allowed = {scid.item_string(int(x)) for x in split.train_items[row]}
        if mode == "sequence":
            items = [s for s, _ in segs[1:]]
            assert len(items) <= 5 and set(items) <= allowed
            assert not segs[1][1]  # the first item of a window is never a target
        else:
            assert segs[-1][0] in allowed
            history = segs[0][0]
            assert history.count("<a_") <= 4
        held_out = {scid.item_string(int(split.valid_target[row])),
                    scid.item_string(int(split.test_target[row]))} - allowed
        assert not any(h in "".join(s for s, _ in segs) for h in held_out)


def test_task_weights_set_examples_per_epoch(data, scid):
    split = leave_one_out(data)
    p = builder(data, scid)
    ds = SFTTrainDataset(p, split, {"seqrec": 0.0, "item2index": 0.5, "index2user": 2.0},
                         "sequence", 5, 20)
    assert ds.counts == {"item2index": NUM_ITEMS // 2, "index2user": 2 * NUM_USERS}
    with pytest.raises(ValueError, match="unknown SFT task"):
        SFTTrainDataset(p, split, {"nope": 1.0}, "sequence", 5, 20)


def test_datasets_without_their_own_templates_get_the_domain_neutral_ones():
    assert default_templates_path("ml-100k").name == "ml100k_prompts.yaml"
    path = default_templates_path("Beauty")
    assert path.name == "default_prompts.yaml"
    text = path.read_text()
    assert "movie" not in text.lower() and "Which item next?" in text
    from lightning_modules.components.prompts import load_templates

    load_templates(path)  # has every required key
