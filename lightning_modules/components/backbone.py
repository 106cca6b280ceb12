"""Backbone builder: an HF causal LM (pretrained by name/path, or a tiny one built from a config),
its tokenizer with the SCID vocabulary added, and the fine-tuning mode (full or LoRA via peft).

Two ways to get a backbone, chosen by :class:`BackboneConfig`:

* ``name_or_path`` set (e.g. ``Qwen/Qwen2.5-0.5B``, ``meta-llama/Llama-2-7b-hf`` or a local
  folder): ``AutoModelForCausalLM`` + ``AutoTokenizer``. Needs the hub or a local copy.
* ``name_or_path`` unset (the CPU default): a randomly initialised Llama or Qwen2 model with the
  sizes given here and a byte-level BPE tokenizer trained on the dataset's text
  (:mod:`lightning_modules.components.text_tokenizer`).

Either way the SCID tokens are added to the tokenizer and the embedding matrix (and LM head) are
resized. Fine-tuning is ``full`` (every weight trains; right for the random tiny model, which
has nothing to preserve) or ``lora`` (peft adapters on the attention/MLP projections, with the
new token rows trainable through ``modules_to_save`` or peft's ``trainable_token_indices``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lightning_modules.components.dropout import fast_dropout
from lightning_modules.components.text_tokenizer import (
    add_scid_tokens,
    ensure_special_tokens,
    train_text_tokenizer,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (used when ``BackboneConfig.finetuning == "lora"``).

    Attributes:
        r, alpha, dropout: LoRA rank, scaling numerator and dropout (paper: 8, 16, 0.05).
        target_modules: linear layers that get adapters (paper: all attention + MLP projections).
        new_tokens: how the added SCID rows train: ``modules_to_save`` (a full trainable copy of
            ``embed_tokens`` and ``lm_head``, as in the paper) or ``trainable_token_indices``
            (only the new rows of the input embedding train; cheaper for 7B models, but then the
            LM head stays frozen unless it is tied to the embeddings).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    new_tokens: str = "modules_to_save"


@dataclass
class BackboneConfig:
    """Which causal LM to use and how to fine-tune it.

    Attributes:
        name_or_path: HF hub name or local folder of a pretrained causal LM; ``None`` builds a
            randomly initialised model from the sizes below (the CPU default).
        arch: architecture of the built model, ``llama`` or ``qwen2``.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: sizes of the
            built model (``num_kv_heads`` < ``num_heads`` gives grouped-query attention).
        max_position_embeddings: longest sequence of the built model.
        tie_word_embeddings: share the input embedding and LM head of the built model.
        text_vocab_size: size of the BPE vocabulary trained on the dataset's text (built model).
        finetuning: ``full`` or ``lora`` (LoRA settings: :class:`LoraSettings`, given
            separately to :func:`build_model`).
        dtype: ``float32`` or ``bfloat16`` (GPU) weights.
        gradient_checkpointing: trade compute for memory (large backbones on GPU).
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        trust_remote_code: passed to ``from_pretrained`` for custom hub models.
        dropout: dropout of the built model while training, as in GPT-2/SASRec: on the token
            embeddings, on the output of every attention and MLP block (before the residual
            add) and on the attention probabilities. HF Llama/Qwen2 configs only have the last
            one, so the others are forward hooks (not saved with the weights: an exported model
            runs without dropout, like any model in eval mode). 0 = none. The hooks apply to
            pretrained backbones too; the attention-probability dropout to built ones only.
        attention_dropout: attention-probability dropout of the built model; ``None`` = the
            same as ``dropout``. On CPU it is the most expensive part of dropout (SDPA falls
            back to its unfused kernel), so the CPU configs may set it apart.
    """

    name_or_path: str | None = None
    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    text_vocab_size: int = 1024
    finetuning: str = "full"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    dropout: float = 0.0
    attention_dropout: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1) or null, got "
                             f"{self.attention_dropout!r}")
        if self.finetuning not in ("full", "lora"):
            raise ValueError(f"finetuning must be 'full' or 'lora', got {self.finetuning!r}")
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"arch must be 'llama' or 'qwen2', got {self.arch!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def as_backbone_config(cfg: BackboneConfig | dict | None) -> BackboneConfig:
    if cfg is None:
        return BackboneConfig()
    if isinstance(cfg, BackboneConfig):
        return cfg
    return BackboneConfig(**cfg)


def build_tokenizer(cfg: BackboneConfig, corpus: Iterable[str] | None, scid_tokens: list[str]):
    """The backbone's tokenizer with ``scid_tokens`` added; returns ``(tokenizer, scid_ids)``.

    ``corpus`` (the dataset's text) is only needed for a built (non-pretrained) backbone.
    """
    if cfg.name_or_path:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path,
                                            trust_remote_code=cfg.trust_remote_code)
    else:
        if corpus is None:
            raise ValueError("a built backbone needs a text corpus to train its tokenizer on")
        tok = train_text_tokenizer(corpus, vocab_size=cfg.text_vocab_size)
    ensure_special_tokens(tok)
    ids = add_scid_tokens(tok, scid_tokens)
    return tok, ids


def _built_model_config(cfg: BackboneConfig, tokenizer) -> object:
    kw = dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
              max_position_embeddings=cfg.max_position_embeddings,
              tie_word_embeddings=cfg.tie_word_embeddings,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id,
              attention_dropout=cfg.dropout if cfg.attention_dropout is None
              else cfg.attention_dropout)
    return AutoConfig.for_model(cfg.arch, **kw)


def add_hidden_dropout(model: PreTrainedModel, p: float) -> None:
    """Dropout (active in training mode only) on the token embeddings and on the output of
    every attention output projection and MLP down projection, i.e. on each residual branch."""
    if p <= 0:
        return

    def hook(module, args, output):
        return fast_dropout(output, p, module.training)

    branches = [m for name, m in model.named_modules()
                if name.endswith(("self_attn.o_proj", "mlp.down_proj"))]
    if not branches:
        raise ValueError(f"dropout: no attention/MLP output projections (o_proj, down_proj) in "
                         f"{type(model).__name__}; set backbone.dropout: 0 for this model")
    for module in [model.get_input_embeddings(), *branches]:
        module.register_forward_hook(hook)


def loadable_attn_implementation(name: str) -> str:
    """``name``, or ``sdpa`` for flash-attention where CUDA or the ``flash_attn`` package is
    missing (a model trained on a GPU still loads for serving or evaluation on a CPU)."""
    if name.startswith("flash_attention") and not (
            torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        log.info("attention %s is not available here; the model loads with sdpa", name)
        return "sdpa"
    return name


def build_model(cfg: BackboneConfig, tokenizer, new_token_ids: list[int] | None = None,
                lora: LoraSettings | None = None, seed: int | None = None,
                prepare=None) -> PreTrainedModel:
    """The causal LM for ``tokenizer`` (embeddings resized to ``len(tokenizer)``), fine-tuning
    mode applied (see :func:`apply_finetuning`). ``prepare(model)``, when given, runs on the
    plain model before that (e.g. to initialise the new token rows)."""
    if cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, dtype=cfg.torch_dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code)
    else:
        mcfg = _built_model_config(cfg, tokenizer)
        mcfg._attn_implementation = cfg.attn_implementation
        # A private RNG stream: the initialisation depends on `seed` alone, and the global
        # stream (data shuffling, dropout) is left where it was.
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(mcfg, dtype=cfg.torch_dtype)
    if model.get_input_embeddings().weight.shape[0] != len(tokenizer):
        # mean_resizing: new rows start at the mean of the old ones (with a pretrained model this
        # keeps the first logits of new tokens in the normal range).
        model.resize_token_embeddings(len(tokenizer), mean_resizing=bool(cfg.name_or_path))
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    add_hidden_dropout(model, cfg.dropout)
    if prepare is not None:
        prepare(model)
    return apply_finetuning(model, cfg, new_token_ids or [], lora)


def as_lora_settings(lora: LoraSettings | dict | None) -> LoraSettings:
    if lora is None:
        return LoraSettings()
    return lora if isinstance(lora, LoraSettings) else LoraSettings(**lora)


def lora_config(lora: LoraSettings, new_token_ids: list[int]):
    """The peft ``LoraConfig`` for these settings (new SCID rows trainable)."""
    from peft import LoraConfig

    lo = lora
    kwargs = dict(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                  target_modules=list(lo.target_modules), task_type="CAUSAL_LM")
    if lo.new_tokens == "modules_to_save":
        kwargs["modules_to_save"] = ["embed_tokens", "lm_head"]
    elif lo.new_tokens == "trainable_token_indices":
        kwargs["trainable_token_indices"] = {"embed_tokens": list(new_token_ids)}
    else:
        raise ValueError("lora.new_tokens must be 'modules_to_save' or 'trainable_token_indices'")
    return LoraConfig(**kwargs)


def apply_finetuning(model: PreTrainedModel, cfg: BackboneConfig, new_token_ids: list[int],
                     lora: LoraSettings | None = None):
    """``full``: the model as is. ``lora``: a peft model whose new token rows still train."""
    if cfg.finetuning == "full":
        return model
    from peft import get_peft_model

    if cfg.gradient_checkpointing:
        # With frozen embeddings the checkpointed blocks would see inputs without grad.
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(as_lora_settings(lora), new_token_ids))


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
