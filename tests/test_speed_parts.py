"""The pieces that make the stages cheaper compute what they replace: the labelled-positions
LM loss, row packing, the rand-mask dropout, length-grouped batching, SASRec's shifted windows
and cosine schedule, and the per-stage timer."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from callbacks.timing import StageTimer
from datamodules.sequential_data import SequentialDataModule, TrainWindows
from datamodules.sft_data import LengthGroupedSampler
from lightning_modules.components.dropout import FastDropout, fast_dropout, replace_dropout
from lightning_modules.components.lm_loss import causal_lm_loss, pack_rows, takes_packed_rows


def tiny_lm(arch: str = "llama", seed: int = 0):
    cfg = AutoConfig.for_model(arch, vocab_size=97, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def right_padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 5:] = 0
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, :4] = -100                # prompt
    labels[mask == 0] = -100            # padding
    return ids, mask, labels


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_labelled_positions_loss_equals_hf_loss_and_gradient(arch):
    model = tiny_lm(arch)
    ids, mask, labels = right_padded_batch()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = causal_lm_loss(model, ids, mask, labels)
    loss.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    for p, g in zip(model.parameters(), ref_grads):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_labelled_positions_loss_under_lora_matches_hf():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_lm(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                 modules_to_save=["lm_head"]))
    for name, p in model.named_parameters():  # nonzero LoRA B so the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids, mask, labels = right_padded_batch(1)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(causal_lm_loss(model, ids, mask, labels), ref, atol=1e-6)


def test_labelled_positions_loss_falls_back_for_other_heads():
    cfg = AutoConfig.for_model("gpt2", vocab_size=97, n_embd=32, n_layer=1, n_head=2,
                               n_positions=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()  # no dropout: two passes compared
    ids, mask, labels = right_padded_batch(2)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(causal_lm_loss(model, ids, mask, labels), ref)


def test_fast_dropout_is_inverted_dropout_in_training_only():
    x = torch.ones(200_000)
    assert fast_dropout(x, 0.2, training=False) is x
    torch.manual_seed(0)
    y = fast_dropout(x, 0.2, training=True)
    zero = (y == 0).float().mean().item()
    assert abs(zero - 0.2) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.8))
    torch.manual_seed(0)
    assert torch.equal(fast_dropout(x, 0.2, training=True), y)  # seeded by the global stream


def test_sasrec_dropouts_are_swapped_and_eval_is_unchanged():
    from lightning_modules.sasrec import SASRecEncoder

    enc = SASRecEncoder(num_items=30, max_history=8, hidden_size=16, num_layers=2, num_heads=2,
                        dropout=0.5, attn_dropout=0.5)
    kinds = {type(m) for m in enc.modules() if isinstance(m, torch.nn.Dropout)}
    assert kinds == {FastDropout}
    assert replace_dropout(enc) == 0                      # nothing left to swap
    ids = torch.randint(0, 31, (3, 8))
    enc.eval()
    assert torch.equal(enc(ids), enc(ids))                # no dropout in eval mode
    enc.train()
    assert not torch.equal(enc(ids), enc(ids))


def test_length_grouped_sampler_is_a_seeded_permutation_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 100, size=1000).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=16, group_batches=10, seed=3)
    first, second = list(sampler), list(sampler)          # two epochs
    assert sorted(first) == list(range(1000)) and sorted(second) == list(range(1000))
    assert first != second
    assert LengthGroupedSampler(lengths, 16, 10, seed=3).order(0) == first

    def padded(order):
        arr = np.asarray(lengths)[order]
        return sum(int(arr[i:i + 16].max()) * len(arr[i:i + 16]) for i in range(0, 1000, 16))

    random_order = rng.permutation(1000).tolist()
    assert padded(first) < 0.75 * padded(random_order)


def test_shifted_windows_cover_every_target_and_keep_the_most_recent():
    seqs = [np.arange(1000 * k, 1000 * k + n) for k, n in enumerate((2, 7, 23, 64, 131))]
    for seed in range(5):
        ds = TrainWindows(seqs, max_history=20, stride=20, rng=np.random.default_rng(seed))
        covered: dict[int, int] = {}
        for w in ds.windows:
            assert 2 <= len(w) <= 21
            for t in w[1:]:
                covered[int(t)] = covered.get(int(t), 0) + 1
        for s in seqs:
            assert any(np.array_equal(w, s[-21:]) for w in ds.windows)   # most recent window
            assert all(1 <= covered[int(t)] <= 2 for t in s[1:])       # every target trained
            assert int(s[0]) not in covered


def test_unshifted_windows_are_the_fixed_stride_tiling():
    seqs = [np.arange(50)]
    fixed = TrainWindows(seqs, max_history=20, stride=5)
    ends = [int(w[-1]) + 1 for w in fixed.windows]
    assert ends == list(range(50, 1, -5))


def test_sequential_options_are_validated():
    with pytest.raises(ValueError, match="train_stride"):
        SequentialDataModule(train_stride=0)
    from lightning_modules.sasrec import SASRec
    with pytest.raises(ValueError, match="lr_schedule"):
        SASRec(lr_schedule="linear")


def test_cosine_schedule_warms_up_and_decays_to_the_floor():
    from lightning_modules.sasrec import SASRec

    model = SASRec(num_items=10, lr=1e-2, lr_schedule="cosine", warmup_ratio=0.1,
                   min_lr_ratio=0.1)

    class FakeTrainer:
        estimated_stepping_batches = 100

    model._trainer = FakeTrainer()
    cfg = model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-2)
    assert lrs[-1] == pytest.approx(1e-3, rel=0.05)


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["input_ids"].float()).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n):
    data = [{"input_ids": torch.ones(4), "attention_mask": torch.tensor([1, 1, 1, 0]),
             "rows": torch.tensor(i)} for i in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=4)


def test_stage_timer_counts_phases_rows_tokens_and_users():
    timer = StageTimer()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
    model = _Tiny()
    trainer.fit(model, _loader(12), _loader(8))
    trainer.test(model, _loader(6))
    out = timer.summary({"export": 0.5})
    assert out["epochs"] == 2 and out["train_rows"] == 24 and out["train_tokens"] == 72
    assert out["fit_validation_users"] == 16 and out["test_users"] == 6
    sec = out["seconds"]
    assert sec["export"] == 0.5 and sec["fit"] >= sec["train"] > 0
    assert sec["fit"] == pytest.approx(sec["train"] + sec["fit_validation"], abs=0.02)


def test_default_threads_follow_the_environment_then_half_the_cores(monkeypatch):
    import os

    from cli import default_threads

    monkeypatch.delenv("ALIGN3GR_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert default_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("ALIGN3GR_THREADS", "2")
    assert default_threads() == 2
    monkeypatch.setenv("ALIGN3GR_THREADS", "zero")
    with pytest.raises(SystemExit, match="ALIGN3GR_THREADS"):
        default_threads()



@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_label_smoothing_is_the_smoothed_cross_entropy_on_labelled_positions(arch):
    if arch == "gpt2":  # the fallback path (model's own logits)
        cfg = AutoConfig.for_model("gpt2", vocab_size=97, n_embd=32, n_layer=1, n_head=2,
                                   n_positions=64)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    else:
        model = tiny_lm(arch).eval()
    ids, mask, labels = right_padded_batch(2)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits[keep], dim=-1)
    nll = -logp.gather(1, target[keep][:, None]).squeeze(1)
    eps = 0.1
    expected = ((1 - eps) * nll - eps * logp.mean(dim=-1)).mean()
    got = causal_lm_loss(model, ids, mask, labels, label_smoothing=eps)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(causal_lm_loss(model, ids, mask, labels, label_smoothing=0.0),
                          nll.mean(), atol=1e-5)
    assert not torch.allclose(got, nll.mean(), atol=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        causal_lm_loss(model, ids, mask, labels, label_smoothing=1.0)


def ragged_batch(seed: int = 0, left: bool = False):
    """Rows of lengths 11, 3, 7, 1, 0 and 5 (one empty), padded right or left."""
    g = torch.Generator().manual_seed(seed)
    lengths = [11, 3, 7, 1, 0, 5]
    ids = torch.randint(3, 97, (len(lengths), 11), generator=g)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        if left:
            mask[r, 11 - n:] = 1
        else:
            mask[r, :n] = 1
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :4] = -100                # a prompt that is not trained
    if left:  # a padded batch would train "padding -> first token"; rows never do
        first = mask.argmax(1)
        labels[torch.arange(len(lengths)), first] = -100
    return ids, mask, labels, lengths


def test_pack_rows_lays_rows_end_to_end_with_their_own_targets_and_mask():
    ids, mask, labels, lengths = ragged_batch()
    packed = pack_rows(ids, mask, labels)
    assert packed.rows == 5 and packed.input_ids.shape == (3, 11)  # 11 | 7+3+1 | 5
    assert int((packed.position_ids.flatten() == 0).sum()) == 5 + (3 * 11 - 27)  # starts + empty
    # Every row's tokens appear once, in order, at positions 0..n-1, with targets = next label.
    for r, n in enumerate(lengths):
        if n == 0:
            continue
        row = ids[r][mask[r].bool()]
        hits = [(s, c) for s in range(3) for c in range(11 - n + 1)
                if torch.equal(packed.input_ids[s, c:c + n], row)
                and torch.equal(packed.position_ids[s, c:c + n], torch.arange(n))]
        assert hits, f"row {r} not found"
        s, c = hits[0]
        want = torch.cat([labels[r][mask[r].bool()][1:], torch.tensor([-100])])
        assert torch.equal(packed.targets[s, c:c + n], want)
        block = packed.attention_mask[s, 0, c:c + n, c:c + n]
        assert torch.equal(block, torch.ones(n, n, dtype=torch.bool).tril())
        # ... and sees nothing of the rows packed beside it.
        assert int(packed.attention_mask[s, 0, c:c + n].sum()) == n * (n + 1) // 2
    # The last token of a packed row never predicts the next row's first token.
    assert int((packed.targets != -100).sum()) == int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("arch,impl,left", [("llama", "sdpa", False), ("qwen2", "sdpa", True),
                                            ("llama", "eager", False)])
def test_packed_loss_equals_padded_loss_and_gradient(arch, impl, left):
    model = tiny_lm(arch).eval()
    model.config._attn_implementation = impl
    ids, mask, labels, _ = ragged_batch(1, left=left)
    ref = causal_lm_loss(model, ids, mask, labels)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = causal_lm_loss(model, ids, mask, labels, pack=True)
    loss.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    for p, g in zip(model.parameters(), ref_grads):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_packing_is_skipped_where_the_attention_takes_no_4d_mask():
    model = tiny_lm().eval()
    assert takes_packed_rows(model)
    model.config._attn_implementation = "flash_attention_2"
    assert not takes_packed_rows(model)
    model.config._attn_implementation = "sdpa"
    cfg = AutoConfig.for_model("gpt2", vocab_size=97, n_embd=32, n_layer=1, n_head=2,
                               n_positions=64)
    gpt2 = AutoModelForCausalLM.from_config(cfg).eval()
    assert not takes_packed_rows(gpt2)
    ids, mask, labels = right_padded_batch()
    # The fallback is the padded loss, not an error.
    assert torch.allclose(causal_lm_loss(gpt2, ids, mask, labels, pack=True),
                          gpt2(input_ids=ids, attention_mask=mask, labels=labels).loss,
                          atol=1e-6)
