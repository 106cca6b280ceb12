"""Backbone builder: built tiny LM + trained tokenizer, SCID tokens, LoRA with trainable rows."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.backbone import (
    BackboneConfig,
    LoraSettings,
    build_model,
    build_tokenizer,
    count_parameters,
)

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
            text_vocab_size=300)
CORPUS = ["Toy Story, 1995, Animation, Children's, Comedy", "age: 24, gender: M, occupation: "
          "technician", "User watched. Which movie next?"] * 20
SCID = [f"<{p}_{c}>" for p in "abc" for c in range(8)] + [f"<{p}_{c}>" for p in "uv"
                                                           for c in range(4)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_built_backbone_has_scid_tokens_and_resized_embeddings(arch):
    cfg = BackboneConfig(arch=arch, **TINY)
    tok, ids = build_tokenizer(cfg, CORPUS, SCID)
    assert len(set(ids)) == len(SCID) and min(ids) >= 300 - 1
    enc = tok("Which movie is <a_3><b_0><c_7>?", add_special_tokens=False)["input_ids"]
    assert [ids[3], ids[8], ids[23]] == enc[-4:-1]  # each SCID is one whole token
    model = build_model(cfg, tok, ids, seed=0)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.model_type == arch
    assert count_parameters(model)["trainable"] == count_parameters(model)["total"]
    assert tok.decode(tok("Toy Story, 1995", add_special_tokens=False)["input_ids"]) == \
        "Toy Story, 1995"


@pytest.mark.parametrize("new_tokens", ["modules_to_save", "trainable_token_indices"])
def test_lora_trains_the_new_token_rows(new_tokens):
    cfg = BackboneConfig(finetuning="lora", **TINY)
    tok, ids = build_tokenizer(cfg, CORPUS, SCID)
    model = build_model(cfg, tok, ids, LoraSettings(r=4, alpha=8, new_tokens=new_tokens), seed=0)
    counts = count_parameters(model)
    assert 0 < counts["trainable"] < counts["total"]
    x = torch.tensor([[tok.bos_token_id] + ids[:6]])
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    emb = [(n, g) for n, g in grads.items() if "embed_tokens" in n]
    assert emb, "no trainable embedding parameters"
    name, g = emb[0]
    assert g is not None
    if new_tokens == "modules_to_save":
        # Full trainable copy: the rows of the SCID tokens in the input got gradients (the last
        # input token predicts nothing, so its row gets none).
        assert g[ids[:5]].abs().sum(dim=1).gt(0).all()
    else:
        # trainable_token_indices: a delta per new token, aligned with the listed ids.
        assert g.shape[0] == len(ids) and g[:5].abs().sum(dim=1).gt(0).all()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("q_proj.base_layer" in n for n in frozen)


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="finetuning"):
        BackboneConfig(finetuning="qlora")
    with pytest.raises(ValueError, match="arch"):
        BackboneConfig(arch="gpt9")
    with pytest.raises(ValueError, match="dropout"):
        BackboneConfig(dropout=1.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dropout_acts_in_training_only_and_is_not_exported(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = BackboneConfig(arch=arch, dropout=0.3, **TINY)
    tok, ids = build_tokenizer(cfg, CORPUS, SCID)
    model = build_model(cfg, tok, ids, seed=0)
    assert model.config.attention_dropout == 0.3
    x = torch.tensor([[tok.bos_token_id] + ids[:6]])
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=x).logits, model(input_ids=x).logits
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        c, d = model(input_ids=x).logits, model(input_ids=x).logits
    assert not torch.allclose(c, d)  # residual/embedding dropout is on while training
    # Without dropout the same weights give the eval-mode logits in training mode too.
    plain = build_model(BackboneConfig(arch=arch, **TINY), tok, ids, seed=0)
    plain.train()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, a, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, a, atol=1e-5)
