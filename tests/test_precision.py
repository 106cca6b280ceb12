"""bfloat16 training steps (``train_precision: bf16``): what runs in which precision, the CPU
attention that stays float32 under autocast, the fallback without native bfloat16, and the
sft stage trained that way (float32 weights, float32 decoding)."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lightning_modules.components import precision as prec
from lightning_modules.components.lm_loss import causal_lm_loss
from lightning_modules.generative_recommender import GenerativeRecommender
from tests.test_sft_stage import TINY, make_dm, scid_map, trainer
from tests.test_speed_parts import right_padded_batch, tiny_lm

CPU = torch.device("cpu")


@pytest.mark.parametrize("value,expected", [("32", "32"), (32, "32"), ("32-true", "32"),
                                            ("bf16", "bf16"), ("bf16-mixed", "bf16")])
def test_train_precision_values(value, expected):
    assert prec.check_train_precision(value) == expected


def test_unknown_train_precision_names_the_option():
    with pytest.raises(ValueError, match=r"model\.init_args\.train_precision.*'16'"):
        prec.check_train_precision("16")
    with pytest.raises(ValueError, match="train_precision"):
        GenerativeRecommender(train_precision="fp8")


def test_float32_steps_run_without_autocast():
    with prec.training_autocast("32", CPU):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_bf16_steps_multiply_in_bfloat16_and_keep_float32_weights_and_grads():
    model = tiny_lm()
    ids, mask, labels = right_padded_batch()
    with prec.training_autocast("bf16", CPU):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        loss = causal_lm_loss(model, ids, mask, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    ref_model = tiny_lm()
    ref = causal_lm_loss(ref_model, ids, mask, labels)
    # bfloat16 products: close to the float32 loss, not equal to it.
    assert torch.allclose(loss, ref, rtol=2e-2)
    assert not torch.equal(loss, ref)


def test_cpu_attention_is_float32_under_autocast_and_hf_elsewhere():
    prec.install_cpu_fp32_attention()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)
    module = tiny_lm().model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=8 ** -0.5)
    # Under a CPU autocast, with value in bfloat16 as the projections leave it: float32 math.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention(module, q, k, v.to(torch.bfloat16).float(), None, scaling=8 ** -0.5)
        plain, _ = sdpa_attention_forward(module, q, k, v, None, scaling=8 ** -0.5)
    assert out.dtype == torch.float32
    assert torch.equal(out, sdpa_attention_forward(module, q, k, v.to(torch.bfloat16).float(),
                                                   None, scaling=8 ** -0.5)[0])
    assert plain.dtype == torch.bfloat16  # what autocast alone would have computed
    # Without autocast: HF's function, bit for bit.
    assert torch.equal(attention(module, q, k, v, None, scaling=8 ** -0.5)[0], expected)


def test_without_native_bfloat16_the_step_falls_back_to_float32_and_says_so(monkeypatch,
                                                                            caplog):
    monkeypatch.setattr(prec, "native_bf16", lambda device: False)
    monkeypatch.setattr(prec, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=prec.__name__):
        assert prec.effective_precision("bf16", CPU, "sft") == "32"
        assert prec.effective_precision("bf16", CPU, "sft") == "32"
    assert len([r for r in caplog.records if "no native bfloat16" in r.message]) == 1
    assert prec.effective_precision("32", CPU, "sft") == "32"


def test_sft_stage_trains_in_bf16_and_decodes_in_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(prec, "native_bf16", lambda device: True)  # any CPU runs the path
    calls = []
    real = prec.training_autocast

    def spy(precision, device):
        calls.append(precision)
        return real(precision, device)

    monkeypatch.setattr("lightning_modules.generative_recommender.training_autocast", spy)
    scid_map().save(tmp_path / "tokenizer")
    L.seed_everything(0, verbose=False)
    dm = make_dm(tmp_path)
    model = GenerativeRecommender(run_dir=str(tmp_path), backbone=TINY, lr=3e-3,
                                  train_precision="bf16")
    tr = trainer(limit_train_batches=4, limit_val_batches=1)
    tr.fit(model, datamodule=dm)
    assert calls == ["bf16"] * 4
    assert all(p.dtype == torch.float32 for p in model.model.parameters())
    assert not torch.is_autocast_enabled("cpu")
    # Decoding is float32 and deterministic: the same lists twice, valid items only.
    prompts = model.build_prompts(torch.arange(4), "test")
    first, scores = model.recommend(prompts, None, 20)
    again, _ = model.recommend(prompts, None, 20)
    assert scores.dtype == torch.float32
    assert torch.equal(first, again)
    assert model.hparams.train_precision == "bf16"
