"""Causal-LM loss with the LM head applied only where a label is read.

HF's ``model(..., labels=...)`` computes logits for every position of the batch, padding and
prompt included, then discards all but the labelled ones. In SFT rows most positions are
prompt or padding, and with a small model the LM head (``hidden x vocabulary``) and its
log-softmax are a large share of a step, so :func:`causal_lm_loss` runs the decoder, gathers
the hidden states that predict a label, and applies the head to those only. The value (and
gradient) is HF's ``ForCausalLMLoss`` with the default mean over labelled tokens.

The fast path is taken for decoder architectures whose head is a plain projection of the
final hidden state (no logit scaling or soft-capping); any other model uses its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# model_type values whose logits are exactly ``lm_head(decoder(...).last_hidden_state)``.
PLAIN_HEAD_ARCHS = frozenset({"llama", "qwen2", "qwen3", "mistral"})


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_ARCHS:
        return None
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose (shifted) label is not -100.

    Args:
        model: HF causal LM or a peft model around one.
        input_ids, attention_mask, labels: ``[B, T]`` right-padded rows (labels -100 where
            nothing is trained).
        label_smoothing: share of each target's probability spread uniformly over the
            vocabulary (as in ``torch.nn.functional.cross_entropy``); 0 = plain cross-entropy.
    Returns:
        scalar loss (float32); with ``label_smoothing`` 0 it equals
        ``model(input_ids, attention_mask, labels=labels).loss``.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    parts = _decoder_and_head(model)
    if parts is None:
        if label_smoothing == 0.0:
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits[:, :-1][keep].float()
    else:
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep]).float()
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target[keep], label_smoothing=label_smoothing)
