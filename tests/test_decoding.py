"""Trie-constrained beam search: validity, exhaustive equivalence, HF-generate parity, exclusion."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lightning_modules.components.decoding import (  # noqa: E402
    ItemTrie,
    constrained_beam_search,
    prefix_allowed_tokens_fn,
    score_items,
)

VOCAB = 300
PAD, EOS = 0, 2
HF_DEAD = -1e8  # HF keeps padding beams alive with scores around -1e9


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def _catalogue(sizes=(8, 6, 10), num_items=200, offset=100, seed=1) -> torch.Tensor:
    """``[N, L]`` unique item token rows with shared prefixes; level ``l`` uses its own ids."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, s, (4 * num_items,), generator=g) for s in sizes], 1)
    codes = torch.unique(codes, dim=0)
    codes = codes[torch.randperm(codes.shape[0], generator=g)][:num_items]
    starts = torch.tensor([offset + sum(sizes[:i]) for i in range(len(sizes))])
    return codes + starts


def _prompts(lengths=(12, 7, 4, 9), seed=2):
    """Left-padded ``[B, P]`` prompts of different lengths (ids below the item range)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, 100, (n,), generator=g)
        mask[b, width - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def items3():
    return _catalogue()


@pytest.fixture(scope="module")
def prompts():
    return _prompts()


@pytest.fixture(scope="module")
def exhaustive(model, items3, prompts):
    return score_items(model, *prompts, items3)


def _hf(model, ids, mask, trie, width, exclude=None):
    """HF beam search with the prefix callback -> items, scores ``[B, W]`` (-1 / -inf = dead)."""
    fn = prefix_allowed_tokens_fn(trie, ids.shape[1], exclude_items=exclude)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, num_beams=width, num_return_sequences=width,
                             do_sample=False, max_new_tokens=trie.num_levels, min_new_tokens=0,
                             prefix_allowed_tokens_fn=fn, length_penalty=0.0, early_stopping=True,
                             output_scores=True, return_dict_in_generate=True,
                             pad_token_id=PAD, eos_token_id=EOS)
    items = trie.lookup(out.sequences[:, ids.shape[1]:]).view(ids.shape[0], width)
    scores = out.sequences_scores.view(ids.shape[0], width).float()
    live = scores > HF_DEAD
    return torch.where(live, items, -1), scores.masked_fill(~live, float("-inf"))


def assert_exhaustive_order(items: torch.Tensor, exhaustive: torch.Tensor, atol: float = 1e-4):
    """``items`` [B, K] (-1 = empty slot) is the best-first ranking of ``exhaustive`` [B, N]
    (each item's full score; -inf = not rankable), up to swaps of items whose scores tie within
    float noise: the ranked items are distinct, and the true score at every position equals the
    sorted scores at that position."""
    ref_scores = exhaustive.sort(dim=1, descending=True).values
    for b in range(items.shape[0]):
        got = items[b][items[b] >= 0]
        assert len(set(got.tolist())) == got.numel()
        expected = ref_scores[b, : got.numel()]
        assert not torch.isneginf(expected).any()
        torch.testing.assert_close(exhaustive[b, got], expected, atol=atol, rtol=1e-5)


# -- trie ----------------------------------------------------------------------------------
def test_trie_tables(items3):
    trie = ItemTrie(items3)
    n, depth = items3.shape
    assert trie.num_items == n and trie.num_levels == depth and len(trie) == n
    assert torch.equal(trie.lookup(items3), torch.arange(n))
    assert trie.valid(items3).all()
    # every root-to-leaf path of the tables is an item and every item is reached once
    paths = [([], 0)]
    for level in range(depth):
        nxt = []
        for toks, node in paths:
            kids = trie.child_node[level][node].tolist()
            for c, t in zip(kids, trie.child_token[level][node].tolist()):
                if c >= 0:
                    nxt.append((toks + [t], c))
        paths = nxt
    leaves = torch.tensor([trie.leaf_item[node] for _, node in paths])
    assert sorted(leaves.tolist()) == list(range(n))
    assert torch.equal(items3[leaves], torch.tensor([t for t, _ in paths]))
    # children sorted by token, python view agrees
    first = sorted(set(items3[:, 0].tolist()))
    assert trie.allowed_tokens([]) == first
    row = items3[5].tolist()
    assert row[1] in trie.allowed_tokens(row[:1]) and trie.allowed_tokens([299]) == []
    # non-items
    bad = items3[:3].clone()
    bad[0, -1] = 299
    bad[1, 0] = items3[1, 1]
    assert trie.lookup(bad).tolist() == [-1, -1, 2]


def test_trie_rejects_duplicates():
    with pytest.raises(ValueError):
        ItemTrie(torch.tensor([[1, 2], [1, 2]]))


def test_dead_keys_prune_full_subtrees(items3):
    trie = ItemTrie(items3)
    first = items3[0, 0]
    subtree = torch.nonzero(items3[:, 0] == first).squeeze(1)
    excl = torch.full((2, subtree.numel() + 1), -1)
    excl[0, : subtree.numel()] = subtree  # a whole level-1 subtree
    excl[1, :2] = subtree[:2]  # just two of its leaves
    dead = trie.dead_keys(excl)
    node1 = trie.prefix_id[1][subtree[0]]
    assert dead[1].tolist() == [node1.item()]
    assert dead[trie.num_levels].numel() == subtree.numel() + 2


# -- beam search ---------------------------------------------------------------------------
def test_full_width_equals_exhaustive(model, items3, prompts, exhaustive):
    trie = ItemTrie(items3)
    n = items3.shape[0]
    items, scores = constrained_beam_search(model, *prompts, trie, num_beams=n + 7)
    ref_scores = exhaustive.sort(dim=1, descending=True).values
    assert (items[:, :n] >= 0).all()
    assert_exhaustive_order(items[:, :n], exhaustive)
    torch.testing.assert_close(scores[:, :n], ref_scores, atol=1e-4, rtol=1e-5)
    assert (items[:, n:] == -1).all() and torch.isneginf(scores[:, n:]).all()


def test_items_valid_and_tokens(model, items3, prompts):
    trie = ItemTrie(items3)
    items, scores, tokens = constrained_beam_search(model, *prompts, trie, num_beams=16,
                                                    return_tokens=True)
    assert items.shape == (4, 16) and scores.shape == (4, 16) and tokens.shape == (4, 16, 3)
    assert (items >= 0).all() and trie.valid(tokens).all()
    assert torch.equal(items3[items], tokens)
    assert torch.equal(trie.lookup(tokens), items)
    for row in items.tolist():
        assert len(set(row)) == len(row)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


@pytest.mark.parametrize("width", [5, 20])
def test_equals_hf_generate(model, items3, prompts, width):
    trie = ItemTrie(items3)
    items, scores = constrained_beam_search(model, *prompts, trie, num_beams=width)
    hf_items, hf_scores = _hf(model, *prompts, trie, width)
    assert torch.equal(items, hf_items)
    torch.testing.assert_close(scores, hf_scores, atol=1e-4, rtol=1e-5)


def test_equals_hf_generate_four_levels(model, prompts):
    items4 = _catalogue(sizes=(5, 4, 6, 8), num_items=180, offset=60, seed=3)
    trie = ItemTrie(items4)
    items, scores = constrained_beam_search(model, *prompts, trie, num_beams=12)
    hf_items, hf_scores = _hf(model, *prompts, trie, 12)
    assert torch.equal(items, hf_items)
    torch.testing.assert_close(scores, hf_scores, atol=1e-4, rtol=1e-5)


def test_wider_than_first_level(model, prompts):
    """W larger than the root's children: padding beams must not yield duplicates or junk."""
    items_small = _catalogue(sizes=(3, 4, 5), num_items=40, offset=120, seed=4)
    trie = ItemTrie(items_small)
    assert trie.widths[0] == 3
    items, scores = constrained_beam_search(model, *prompts, trie, num_beams=20)
    assert (items >= 0).all()  # 40 items >= 20 beams: every slot is filled
    for row in items.tolist():
        assert len(set(row)) == len(row)
    hf_items, hf_scores = _hf(model, *prompts, trie, 20)
    assert torch.equal(items, hf_items)
    torch.testing.assert_close(scores, hf_scores, atol=1e-4, rtol=1e-5)
    ref = score_items(model, *prompts, items_small)
    torch.testing.assert_close(scores, ref.gather(1, items), atol=1e-4, rtol=1e-5)


def test_fewer_items_than_beams(model, prompts):
    items_tiny = torch.tensor([[110, 150, 190], [110, 151, 190], [111, 150, 192],
                               [112, 153, 191], [110, 150, 191]])
    trie = ItemTrie(items_tiny)
    items, scores = constrained_beam_search(model, *prompts, trie, num_beams=8)
    ref_scores, ref_items = score_items(model, *prompts, items_tiny).sort(dim=1, descending=True)
    assert torch.equal(items[:, :5], ref_items)
    torch.testing.assert_close(scores[:, :5], ref_scores, atol=1e-4, rtol=1e-5)
    assert (items[:, 5:] == -1).all() and torch.isneginf(scores[:, 5:]).all()
    hf_items, hf_scores = _hf(model, *prompts, trie, 8)
    assert torch.equal(items[:, :5], hf_items[:, :5])


def _exclusions(items3):
    """Row 0: nothing; 1: a few leaves; 2: a whole level-1 subtree + dups; 3: most items."""
    g = torch.Generator().manual_seed(5)
    sub = torch.nonzero(items3[:, 0] == items3[7, 0]).squeeze(1)
    rows = [[], torch.randperm(200, generator=g)[:15].tolist(),
            sub.tolist() + sub[:3].tolist() + [11], torch.randperm(200, generator=g)[:190].tolist()]
    width = max(len(r) for r in rows)
    excl = torch.full((4, width), -1)
    for b, r in enumerate(rows):
        excl[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return excl


def test_exclusion_full_width_equals_filtered_ranking(model, items3, prompts, exhaustive):
    trie = ItemTrie(items3)
    excl = _exclusions(items3)
    items, scores = constrained_beam_search(model, *prompts, trie, num_beams=200,
                                            exclude_items=excl)
    for b in range(4):
        drop = {i for i in excl[b].tolist() if i >= 0}
        filtered = exhaustive[b].clone()
        filtered[list(drop)] = float("-inf")
        n_keep = exhaustive.shape[1] - len(drop)
        got = items[b]
        assert (got[:n_keep] >= 0).all() and (got[n_keep:] == -1).all()
        assert_exhaustive_order(got[None, :n_keep], filtered[None])
        ref = filtered.sort(descending=True).values[:n_keep]
        torch.testing.assert_close(scores[b, :n_keep], ref, atol=1e-4, rtol=1e-5)
        assert torch.isneginf(scores[b, n_keep:]).all()


def test_exclusion_equals_hf_on_pruned_trie(model, items3, prompts):
    trie = ItemTrie(items3)
    excl = _exclusions(items3)
    items, scores = constrained_beam_search(model, *prompts, trie, num_beams=12, exclude_items=excl)
    for b in range(4):
        drop = {i for i in excl[b].tolist() if i >= 0}
        assert not drop & set(items[b].tolist())
    assert (items[3] >= 0).sum() == 10  # 10 items left for row 3
    hf_items, hf_scores = _hf(model, *prompts, trie, 12, exclude=excl)
    assert torch.equal(items, hf_items)
    torch.testing.assert_close(scores, hf_scores, atol=1e-4, rtol=1e-5)
    # list-of-lists form gives the same result
    as_lists = [[i for i in r if i >= 0] for r in excl.tolist()]
    items_l, _ = constrained_beam_search(model, *prompts, trie, num_beams=12,
                                         exclude_items=as_lists)
    assert torch.equal(items_l, items)


def test_everything_excluded(model, items3, prompts):
    trie = ItemTrie(items3)
    excl = torch.arange(200).expand(4, 200).clone()
    excl[0] = -1
    items, scores = constrained_beam_search(model, *prompts, trie, num_beams=6, exclude_items=excl)
    assert (items[0] >= 0).all() and (items[1:] == -1).all() and torch.isneginf(scores[1:]).all()


def test_no_padding_and_single_prompt(model, items3, exhaustive, prompts):
    trie = ItemTrie(items3)
    ids, mask = prompts
    one = ids[:1]  # the longest prompt: no padding
    items, scores = constrained_beam_search(model, one, None, trie, num_beams=200)
    ref_scores = exhaustive[:1].sort(dim=1, descending=True).values
    assert (items >= 0).all()
    assert_exhaustive_order(items, exhaustive[:1])
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-5)


def test_peft_lora_model(items3, prompts):
    peft = pytest.importorskip("peft")
    base = _model(seed=7)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)
    wrapped = peft.get_peft_model(base, lora).eval()
    trie = ItemTrie(items3)
    items, scores = constrained_beam_search(wrapped, *prompts, trie, num_beams=200)
    ref_scores, ref_items = score_items(wrapped, *prompts, items3).sort(dim=1, descending=True)
    assert torch.equal(items, ref_items)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-5)
    items_w, scores_w = constrained_beam_search(wrapped, *prompts, trie, num_beams=10)
    hf_items, hf_scores = _hf(wrapped, *prompts, trie, 10)
    assert torch.equal(items_w, hf_items)
    torch.testing.assert_close(scores_w, hf_scores, atol=1e-4, rtol=1e-5)
    # the adapter matters: the base model ranks differently
    with wrapped.disable_adapter():
        base_items, _ = constrained_beam_search(wrapped, *prompts, trie, num_beams=10)
    assert not torch.equal(base_items, items_w)


def test_bad_arguments(model, items3, prompts):
    trie = ItemTrie(items3)
    with pytest.raises(ValueError):
        constrained_beam_search(model, *prompts, trie, num_beams=0)
    with pytest.raises(ValueError):
        constrained_beam_search(model, *prompts, trie, num_beams=3,
                                exclude_items=torch.full((2, 1), -1))
    with pytest.raises(ValueError):
        constrained_beam_search(model, *prompts, trie, num_beams=3,
                                exclude_items=torch.full((4, 1), 500))


def test_single_level_catalogue(model, prompts):
    items1 = torch.arange(100, 140).unsqueeze(1)  # L = 1: one token per item
    trie = ItemTrie(items1)
    items, scores = constrained_beam_search(model, *prompts, trie, num_beams=50)
    ref_scores, ref_items = score_items(model, *prompts, items1).sort(dim=1, descending=True)
    assert torch.equal(items[:, :40], ref_items) and (items[:, 40:] == -1).all()
    torch.testing.assert_close(scores[:, :40], ref_scores, atol=1e-4, rtol=1e-5)


def test_generic_cache_path(items3, prompts, monkeypatch):
    """Caches other than plain DynamicLayer (here a sliding window) use reorder_cache."""
    from transformers import MistralConfig, MistralForCausalLM

    from lightning_modules.components import decoding

    torch.manual_seed(3)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, sliding_window=6, pad_token_id=PAD,
                        eos_token_id=EOS, initializer_range=0.2)
    mistral = MistralForCausalLM(cfg).eval()
    used = []
    original = decoding._expand_cache
    monkeypatch.setattr(decoding, "_expand_cache",
                        lambda *a: used.append(original(*a)) or used[-1])
    trie = ItemTrie(items3)
    items, scores = constrained_beam_search(mistral, *prompts, trie, num_beams=200)
    assert used == [False]
    ref_scores, ref_items = score_items(mistral, *prompts, items3).sort(dim=1, descending=True)
    assert torch.equal(items, ref_items)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-5)
    items_w, scores_w = constrained_beam_search(mistral, *prompts, trie, num_beams=8)
    hf_items, hf_scores = _hf(mistral, *prompts, trie, 8)
    assert torch.equal(items_w, hf_items)
    torch.testing.assert_close(scores_w, hf_scores, atol=1e-4, rtol=1e-5)


def test_bfloat16_model_runs(items3, prompts):
    bf = _model(seed=9).to(torch.bfloat16)
    trie = ItemTrie(items3)
    items, scores, tokens = constrained_beam_search(bf, *prompts, trie, num_beams=10,
                                                    return_tokens=True)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(trie.lookup(tokens), items) and (items >= 0).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_steps_equal_the_repeated_cache(items3, prompts, attn):
    """The packed form (prompt cached once, beams as tokens of one row under a 4-D mask) and
    the repeated-cache form return the same items with the same scores, exclusions, padding
    beams (W > first level) and four levels included."""
    m = _model(seed=5)
    m.config._attn_implementation = attn
    items4 = _catalogue(sizes=(5, 4, 6, 8), num_items=180, offset=60, seed=3)
    g = torch.Generator().manual_seed(8)
    excl4 = torch.full((4, 170), -1)
    for row, n in enumerate((0, 5, 40, 170)):
        excl4[row, :n] = torch.randperm(180, generator=g)[:n]
    for catalogue, excl in ((items3, _exclusions(items3)), (items4, excl4)):
        trie = ItemTrie(catalogue)
        for width, exclude in ((7, None), (30, excl), (3, excl)):
            a_items, a_scores, a_tok = constrained_beam_search(
                m, *prompts, trie, num_beams=width, exclude_items=exclude, return_tokens=True,
                method="packed")
            b_items, b_scores, b_tok = constrained_beam_search(
                m, *prompts, trie, num_beams=width, exclude_items=exclude, return_tokens=True,
                method="cache")
            assert torch.equal(a_items, b_items) and torch.equal(a_tok, b_tok)
            torch.testing.assert_close(a_scores, b_scores, atol=1e-5, rtol=1e-5)


def test_packed_is_the_default_for_sdpa_and_rejects_unknown_methods(model, items3, prompts):
    trie = ItemTrie(items3)
    default, _ = constrained_beam_search(model, *prompts, trie, num_beams=5)
    packed, _ = constrained_beam_search(model, *prompts, trie, num_beams=5, method="packed")
    assert torch.equal(default, packed)
    with pytest.raises(ValueError, match="method"):
        constrained_beam_search(model, *prompts, trie, num_beams=5, method="fast")


# -- the popularity prior (decode_prior) ---------------------------------------------------
def test_log_prior_spreads_item_weights_over_the_tree(items3):
    trie = ItemTrie(items3)
    weights = torch.arange(items3.shape[0], dtype=torch.float64) % 7
    prior = trie.log_prior(weights, smoothing=1.0)
    assert [p.shape[0] for p in prior] == trie.num_nodes[1:]
    for level, lp in enumerate(prior):  # the children of every parent sum to probability 1
        parent = torch.empty(trie.num_nodes[level + 1], dtype=torch.long)
        parent[trie.prefix_id[level + 1]] = trie.prefix_id[level]
        total = torch.zeros(trie.num_nodes[level], dtype=torch.float64)
        total.index_add_(0, parent, lp.double().exp())
        torch.testing.assert_close(total, torch.ones_like(total))
    # Almost no smoothing: an item's path sums to the log of its share of the weights.
    tiny = trie.log_prior(weights + 1.0, smoothing=1e-9)
    path = sum(tiny[lvl][trie.prefix_id[lvl + 1]].double() for lvl in range(trie.num_levels))
    torch.testing.assert_close(path, ((weights + 1) / (weights + 1).sum()).log(), atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="non-negative"):
        trie.log_prior(-weights - 1)
    with pytest.raises(ValueError, match="item_weights must be"):
        trie.log_prior(weights[:5])


def test_node_bias_ranks_by_the_biased_full_score(model, items3, prompts, exhaustive):
    """Full-width beams with ``node_bias = -alpha * log_prior`` return every item ranked by
    ``log p(item) - alpha * log prior(item)``, with those scores."""
    trie = ItemTrie(items3)
    n = items3.shape[0]
    weights = (torch.arange(n) * 37 % 11).double()
    bias = [-0.5 * b for b in trie.log_prior(weights)]
    per_item = sum(bias[lvl][trie.prefix_id[lvl + 1]] for lvl in range(trie.num_levels))
    target = exhaustive + per_item[None, :]
    items, scores = constrained_beam_search(model, *prompts, trie, num_beams=n,
                                            node_bias=bias)
    assert_exhaustive_order(items, target)
    torch.testing.assert_close(scores, target.sort(dim=1, descending=True).values, atol=1e-4,
                               rtol=1e-5)
    # A zero bias is the plain search; a bias of the wrong depth is refused.
    plain = constrained_beam_search(model, *prompts, trie, num_beams=20)
    zero = constrained_beam_search(model, *prompts, trie, num_beams=20,
                                   node_bias=[torch.zeros_like(b) for b in bias])
    assert torch.equal(plain[0], zero[0])
    with pytest.raises(ValueError, match="node_bias needs 3 levels"):
        constrained_beam_search(model, *prompts, trie, num_beams=4, node_bias=bias[:2])
