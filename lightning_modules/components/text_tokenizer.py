"""A small byte-level BPE tokenizer trained on the dataset's own text, wrapped for transformers.

The default CPU backbone is a randomly initialised LM, so it has no tokenizer of its own. A
pretrained tokenizer (32k-150k entries) would make the LM head the most expensive layer of a
model with a few million parameters; a vocabulary of ~1k entries learned from the item titles,
user profiles and prompt templates keeps it small. Byte-level BPE round-trips any text exactly
(``decode(encode(x)) == x``), which the text-generating tasks (index2item) rely on.

SCID tokens (``<a_12>``, ``<u_3>``, ...) are not learned here: :func:`add_scid_tokens` adds them
as whole, un-normalised tokens to any fast tokenizer (this one or a pretrained one).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AddedToken, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 1024,
                         min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    Args:
        texts: training text (item texts, user profiles, prompt templates).
        vocab_size: target vocabulary size including the 256 byte symbols and 4 specials.
        min_frequency: minimum count of a merge.
    Returns:
        A ``PreTrainedTokenizerFast`` with ``<pad>`` (id 0), ``<s>``, ``</s>``, ``<unk>``;
        padding side left (prompts are left-padded for generation), no automatic BOS/EOS
        (the SFT collator places them itself).
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    # add_prefix_space=False: the collator concatenates segments, so a leading space must not
    # appear out of nowhere at segment starts.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw ``tokenizers.Tokenizer`` (e.g. re-read from JSON) with the special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", add_bos_token=False, add_eos_token=False,
        clean_up_tokenization_spaces=False)


def add_scid_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[int]:
    """Add SCID tokens as whole tokens; returns their ids (in the order of ``tokens``).

    ``normalized=False`` keeps pretrained tokenizers (SentencePiece ones in particular) from
    rewriting the token or attaching spaces, so ``"<a_1><b_2>"`` always becomes exactly two ids.
    Tokens already present are kept (their existing id is returned).
    """
    missing = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None,
                                                                         tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False, single_word=False,
                                         lstrip=False, rstrip=False) for t in missing])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    return list(ids)


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Pretrained tokenizers often lack a pad token: reuse EOS (labels mask padding anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token else UNK
    # Prompts are left-padded so that every row's last prompt token sits at the same position
    # when beam search appends codes.
    tokenizer.padding_side = "left"
