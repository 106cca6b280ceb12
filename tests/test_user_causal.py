"""Causal user SCIDs for training prompts: the sasrec stage's user states before every training
target, the tokenizer's codes of those states and the SFT prompts that show them
(``data.init_args.user_scid_causal``)."""

from __future__ import annotations

import random

import pytest
import torch

from datamodules.base import pad_left
from datamodules.sequential_data import SequentialDataModule
from lightning_modules.components.artifacts import (
    USER_PREFIX_CODES_FILE,
    USER_PREFIX_EMBEDDING_FILE,
    atomic_torch_save,
)
from lightning_modules.components.scid_map import load_scid_map
from tests.test_sft_stage import make_dm, scid_map
from tests.test_tokenizer_stage import COLLAB_DIM, USERS, data, fake_sasrec, small_model
from tests.test_tokenizer_stage import trainer as tokenizer_trainer


def test_user_prefix_loader_gives_the_history_before_every_training_target():
    dm = SequentialDataModule(max_users=30, max_history=5)
    loader, offsets = dm.user_prefix_loader()
    split = dm.split
    counts = offsets.diff()
    for row, user in enumerate(split.users):
        assert int(counts[int(user)]) == len(split.train_items[row]) - 1
    assert int(offsets[-1]) == sum(len(s) - 1 for s in split.train_items)
    ids = torch.cat([b["input_ids"] for b in loader])
    rows = torch.cat([b["rows"] for b in loader])
    assert torch.equal(rows, torch.arange(int(offsets[-1])))
    row = 3
    user, seq = int(split.users[row]), split.train_items[row]
    for p in (1, 4, len(seq) - 1):
        got = ids[int(offsets[user]) + p - 1]
        assert got[got > 0].tolist() == (seq[max(0, p - 5):p] + 1).tolist()


def test_sasrec_writes_the_state_before_every_training_target(tmp_path):
    from lightning_modules.sasrec import SASRec

    dm = SequentialDataModule(max_users=20, max_history=5)
    dm.load()
    torch.manual_seed(0)
    model = SASRec(num_items=dm.num_items, max_history=5, hidden_size=16, num_layers=1,
                   num_heads=1)
    model.write_embeddings(dm, tmp_path)
    model.eval()

    def state(items):
        return model.encode_users(pad_left([items + 1], 5, 0))[0].detach()

    blob = torch.load(tmp_path / USER_PREFIX_EMBEDDING_FILE)
    states, offsets = blob["states"], blob["offsets"]
    split = dm.split
    row, p = 2, 3
    user, seq = int(split.users[row]), split.train_items[row]
    assert torch.allclose(states[int(offsets[user]) + p - 1], state(seq[:p]), atol=1e-5)
    # The last prefix is one item short of the training history the user SCID is made from.
    full = torch.load(tmp_path / "user_embeddings.pt")[user]
    assert torch.allclose(full, state(seq[-5:]), atol=1e-5)
    assert not torch.allclose(states[int(offsets[user + 1]) - 1], full, atol=1e-3)


def _prefix_states(run_dir, same_as_users: bool):
    """Prefix states for fake_sasrec's users: each user's own state repeated (its codes must
    then be the user's unresolved codes), or random states."""
    dm = data(run_dir)
    dm.load()
    offsets = torch.from_numpy(dm.split.prefix_offsets(dm.dataset.num_users))
    counts = offsets.diff()
    users = torch.load(run_dir / "sasrec" / "user_embeddings.pt")
    states = users.repeat_interleave(counts, dim=0) if same_as_users else \
        torch.randn(int(offsets[-1]), COLLAB_DIM, generator=torch.Generator().manual_seed(2))
    atomic_torch_save({"states": states, "offsets": offsets},
                      run_dir / "sasrec" / USER_PREFIX_EMBEDDING_FILE)
    return offsets


def _tokenize(run_dir):
    torch.manual_seed(0)
    dm, model = data(run_dir), small_model(run_dir)
    tokenizer_trainer().fit(model, datamodule=dm)
    model.export_artifacts()
    return model, load_scid_map(run_dir / "tokenizer")


def test_tokenizer_exports_causal_user_codes(tmp_path):
    run_dir = fake_sasrec(tmp_path)
    offsets = _prefix_states(run_dir, same_as_users=True)
    model, m = _tokenize(run_dir)
    blob = torch.load(run_dir / "tokenizer" / USER_PREFIX_CODES_FILE)
    codes = blob["codes"]
    assert torch.equal(blob["offsets"], offsets)
    assert codes.shape == (int(offsets[-1]), m.user_levels)
    # The same inputs as the user's training-history ones: the quantizer's own codes of them.
    with torch.no_grad():
        raw = model.quantizer_for("users").encode(model.fuse("users", torch.arange(USERS)))
    owner = torch.repeat_interleave(torch.arange(USERS), offsets.diff())
    assert torch.equal(codes[:, :raw.shape[1]], raw[owner].cpu())
    assert (codes[:, raw.shape[1]:] == 0).all()
    # Codes the user SCID keeps (no collision moved them) are the same.
    same = (m.user_codes[:, :raw.shape[1]] == raw.cpu()).all(dim=1)
    assert same.float().mean() > 0.5


def test_tokenizer_without_prefix_states_exports_no_causal_codes(tmp_path):
    run_dir = fake_sasrec(tmp_path)  # a sasrec stage of an earlier version
    stale = run_dir / "tokenizer" / USER_PREFIX_CODES_FILE
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier export")
    _tokenize(run_dir)
    assert not stale.exists()


def test_bad_prefix_states_name_the_file(tmp_path):
    run_dir = fake_sasrec(tmp_path)
    atomic_torch_save({"states": torch.zeros(3, COLLAB_DIM), "offsets": torch.zeros(2)},
                      run_dir / "sasrec" / USER_PREFIX_EMBEDDING_FILE)
    with pytest.raises(ValueError, match=f"{USER_PREFIX_EMBEDDING_FILE}: expected"):
        data(run_dir).setup()


def _causal_dm(tmp_path, **kw):
    m = scid_map()
    m.save(tmp_path / "tokenizer")
    dm = make_dm(tmp_path, **kw)
    dm.load()
    offsets = torch.from_numpy(dm.split.prefix_offsets(m.num_users))
    counts = offsets.diff()
    # Prefix p of every user gets the codes (p % 12, 0, 0): the prompt names the prefix.
    p = torch.cat([torch.arange(1, int(c) + 1) for c in counts])
    codes = torch.stack([p % 12, torch.zeros_like(p), torch.zeros_like(p)], dim=1)
    atomic_torch_save({"codes": codes, "offsets": offsets},
                      tmp_path / "tokenizer" / USER_PREFIX_CODES_FILE)
    return dm, m


def _user_tokens(text: str) -> str:
    start = text.index("<u_")
    return text[start:text.index(">", text.index("<w_", start)) + 1]


def test_training_prompts_show_the_user_scid_before_their_first_target(tmp_path):
    dm, m = _causal_dm(tmp_path, user_scid_causal=True, seqrec_mode="sequence")
    dm.setup()
    ds = dm.train_dataset()
    random.seed(0)
    checked = 0
    for i, (task, spec) in enumerate(ds.specs):
        if task != "seqrec":
            continue
        row, k = spec
        random.seed(i)
        segs, _ = ds[i]
        random.seed(i)
        items, first, start = ds._window(row, k)
        assert _user_tokens(segs[0][0]) == f"<u_{(start + first) % 12}><v_0><w_0>"
        checked += 1
    assert checked > 20
    # Evaluation prompts and the user alignment tasks keep the training-history SCID.
    user = int(dm.split.users[0])
    prompt = dm.prompts.seqrec_prompt(user, dm.split.train_items[0][-3:])
    assert m.user_string(user) in prompt
    assert m.user_string(user) in dm.prompts.index2user(user)[0][0]


def test_prompt_mode_and_fusion_rows_name_their_target_position(tmp_path):
    dm, _ = _causal_dm(tmp_path, user_scid_causal=True, seqrec_mode="prompt")
    dm.setup()
    user, seq = int(dm.split.users[1]), dm.split.train_items[1]
    segs = dm.prompts.seqrec(user, seq[:4], int(seq[4]), prefix=4)
    assert _user_tokens(segs[0][0]) == "<u_4><v_0><w_0>"
    with pytest.raises(IndexError, match="no training prefix of length"):
        dm.prompts.user_scid(user, prefix=len(seq))


def test_off_by_default_and_missing_codes_are_a_clear_error(tmp_path):
    dm, m = _causal_dm(tmp_path)
    dm.setup()
    user, seq = int(dm.split.users[1]), dm.split.train_items[1]
    segs = dm.prompts.sequence_segments(user, seq[:6], 1, prefix=1)
    assert m.user_string(user) in segs[0][0]
    (tmp_path / "tokenizer" / USER_PREFIX_CODES_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="user_scid_causal=true needs"):
        make_dm(tmp_path, user_scid_causal=True).setup()


def test_codes_of_other_data_are_rejected(tmp_path):
    _causal_dm(tmp_path)
    with pytest.raises(ValueError, match="prefix codes, but this split gives it"):
        make_dm(tmp_path, user_scid_causal=True, max_users=60).setup()
    # Codes of fewer users than the split has: named, not an IndexError.
    atomic_torch_save({"codes": torch.zeros(3, 3, dtype=torch.long),
                       "offsets": torch.tensor([0, 1, 3])},
                      tmp_path / "tokenizer" / USER_PREFIX_CODES_FILE)
    with pytest.raises(ValueError, match="offsets for 2 users, but this split has user"):
        make_dm(tmp_path, user_scid_causal=True).setup()


def test_preference_prompts_show_the_user_scid_before_their_position(tmp_path):
    from datamodules.preference_data import PreferenceDataModule, PromptSpec

    _, m = _causal_dm(tmp_path)
    args = dict(dataset="ml-100k", run_dir=str(tmp_path), max_users=50, seed=0)
    dm = PreferenceDataModule(user_scid_causal=True, **args)
    dm.setup()
    row = 2
    user, seq = int(dm.split.users[row]), dm.split.train_items[row]
    specs = [PromptSpec(row=row, position=p, user=user, chosen=int(seq[p])) for p in (3, 7)]
    prompts = dm.prompt_texts(specs)
    assert [_user_tokens(p) for p in prompts] == ["<u_3><v_0><w_0>", "<u_7><v_0><w_0>"]
    plain = PreferenceDataModule(**args)
    assert m.user_string(user) in plain.prompt_texts(specs)[0]
