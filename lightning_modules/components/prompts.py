"""Prompt builders of the SFT tasks and the tokenisation that turns them into training rows.

Shared by the data side (training rows) and the model side (evaluation and serving prompts),
so it lives below both.

Tasks (Align3GR behaviour level; templates in ``configs/templates/<dataset>_prompts.yaml``):

=================  ==========================================  ==========================
task               prompt                                      response
=================  ==========================================  ==========================
seqrec             user (+SCID) and history item SCIDs         next item SCID
item2index         item text                                   item SCID
index2item         item SCID                                   item text
user2index         user profile text                           user SCID
index2user         user SCID                                   user profile text
fusionseqrec       history SCIDs / history titles              next title / next SCID
=================  ==========================================  ==========================

A training example is a list of *segments* ``(text, trained)``; :func:`encode_segments` puts
BOS in front, tokenizes each segment and sets the labels of untrained segments to -100, so the
loss covers response tokens only. The one-pass sequence form of seqrec (``sequence_segments``)
is a prefix followed by every history item as its own trained segment: one causal pass then
trains next-item prediction at every position of the window.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml

from lightning_modules.components.scid_map import SCIDMap

if TYPE_CHECKING:  # the data schema, for annotations only (components import no datamodule)
    from datamodules.schema import RecDataset

IGNORE_INDEX = -100
CATALOG_FILE = "catalog.json"  # beside an exported model: see PromptBuilder.catalog
CATALOG_FORMAT = "align3gr-catalog/1"
TASKS = ("seqrec", "item2index", "index2item", "user2index", "index2user", "fusionseqrec")
_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "configs" / "templates"

Segments = list[tuple[str, bool]]


def default_templates_path(dataset: str) -> Path:
    """``configs/templates/<dataset>_prompts.yaml`` (``ml-100k`` -> ``ml100k``); the
    domain-neutral ``default_prompts.yaml`` for datasets without their own."""
    name = dataset.replace("-", "").replace("_", "").lower()
    path = _TEMPLATE_DIR / f"{name}_prompts.yaml"
    return path if path.exists() else _TEMPLATE_DIR / "default_prompts.yaml"


def load_templates(path: str | Path) -> dict:
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    required = ("wrapper", "user_with_id", "user_without_id", "sequence", "seqrec")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path}: prompt templates lack {missing}")
    return data


class PromptBuilder:
    """Builds the (prompt, response) text of every task for one dataset, split and SCID map.

    Args:
        dataset: the canonical dataset (item and user text).
        scid_map: item (and optionally user) SCIDs.
        templates: a templates dict or the path of a templates YAML file.
        inject_user: put the user's SCID into user-centred prompts (needs user codes).
        max_history: most recent history items in a prompt (protocol: 20).
        fusion_history: history titles in ``fusionseqrec`` prompts (titles are long).
        seqrec_mode: ``sequence`` (one-pass prefix + items form) or ``prompt`` (instruction
            per prefix, the paper's form); decides the evaluation prompt too.
        item_fields: item text fields in text responses (``None``: all).
    """

    def __init__(self, dataset: RecDataset | None, scid_map: SCIDMap,
                 templates: dict | str | Path, inject_user: bool = True, max_history: int = 20,
                 fusion_history: int = 5, seqrec_mode: str = "sequence",
                 item_fields: list[str] | None = None,
                 titles: list[str] | None = None) -> None:
        if seqrec_mode not in ("sequence", "prompt"):
            raise ValueError(f"seqrec_mode must be 'sequence' or 'prompt', got {seqrec_mode!r}")
        if dataset is None and titles is None:
            raise ValueError("PromptBuilder needs the dataset or, for prompts only, the titles")
        if dataset is not None and scid_map.num_items != dataset.num_items:
            raise ValueError(f"SCID map has {scid_map.num_items} items, dataset "
                             f"{dataset.name} has {dataset.num_items}: they do not belong together")
        self.dataset = dataset
        self.scid_map = scid_map
        self.templates = templates if isinstance(templates, dict) else load_templates(templates)
        self.inject_user = bool(inject_user and scid_map.has_users)
        self.max_history = max_history
        self.fusion_history = fusion_history
        self.seqrec_mode = seqrec_mode
        self.item_fields = item_fields
        self._titles = titles
        self._item_str = [scid_map.item_string(i) for i in range(scid_map.num_items)]
        self._user_str = ([scid_map.user_string(u) for u in range(scid_map.num_users)]
                          if scid_map.has_users else None)
        self._refreshed_user_str = {
            split: [scid_map.user_string(u, split) for u in range(scid_map.num_users)]
            for split in scid_map.user_refreshed_codes}
        self._prefix_codes: tuple[torch.Tensor, torch.Tensor] | None = None  # (codes, offsets)
        sep = self.templates.get("history_separator", "")
        self._sep = sep if sep is not None else ""

    # -- pieces -----------------------------------------------------------------------------
    def item_scid(self, item: int) -> str:
        return self._item_str[int(item)]

    def use_prefix_user_codes(self, codes: torch.Tensor, offsets: torch.Tensor) -> None:
        """Training prompts that name a prefix (``prefix=p``: the history before the target is
        the user's first ``p`` training items) show the user SCID of the codes
        ``codes[offsets[user] + p - 1]`` (the tokenizer's causal user codes, see
        :data:`~lightning_modules.components.artifacts.USER_PREFIX_CODES_FILE`)."""
        if codes.dim() != 2 or codes.shape[1] != self.scid_map.user_levels or \
                len(offsets) != self.scid_map.num_users + 1 or int(offsets[-1]) != len(codes):
            raise ValueError(f"prefix user codes {tuple(codes.shape)} with {len(offsets)} "
                             f"offsets do not fit this SCID map ({self.scid_map.num_users} "
                             f"users, {self.scid_map.user_levels} levels)")
        self._prefix_codes = (codes.long(), offsets.long())

    def user_scid(self, user: int, refreshed_for: str | None = None,
                  prefix: int | None = None) -> str:
        """The user's SCID; ``refreshed_for`` (``"test"``, ``"predict"``): the one re-encoded
        from that split's history (:attr:`SCIDMap.user_refreshed_codes`); ``prefix``: the one
        encoded before the user's training item ``prefix`` when prefix codes are in use
        (:meth:`use_prefix_user_codes`; otherwise the training-history one)."""
        if self._user_str is None:
            raise ValueError("the SCID map has no user codes")
        if prefix is not None and self._prefix_codes is not None:
            codes, offsets = self._prefix_codes
            row = int(offsets[int(user)]) + int(prefix) - 1
            if not int(offsets[int(user)]) <= row < int(offsets[int(user) + 1]):
                raise IndexError(f"user {user} has no training prefix of length {prefix}")
            return "".join(self.scid_map.user_code_tokens(codes[row]))
        if refreshed_for is None:
            return self._user_str[int(user)]
        if refreshed_for not in self._refreshed_user_str:
            self.scid_map.user_string(int(user), refreshed_for)  # raises, naming what is missing
        return self._refreshed_user_str[refreshed_for][int(user)]

    def user_phrase(self, user: int, refreshed_for: str | None = None,
                    prefix: int | None = None) -> str:
        if self.inject_user:
            return self.templates["user_with_id"].format(
                user_id=self.user_scid(user, refreshed_for, prefix))
        return self.templates["user_without_id"]

    def history_string(self, history: Sequence[int]) -> str:
        """SCIDs of the most recent ``max_history`` items, oldest first."""
        hist = list(history)[-self.max_history:] if self.max_history else list(history)
        return self._sep.join(self._item_str[int(i)] for i in hist)

    def item_text(self, item: int) -> str:
        if self.dataset is None:
            return self._titles[int(item)]
        return self.dataset.item_text(int(item), self.item_fields) or f"item {item}"

    def item_title(self, item: int) -> str:
        if self.dataset is None:
            return self._titles[int(item)]
        feats = self.dataset.item_features
        if feats is not None and feats[int(item)].get("title"):
            return feats[int(item)]["title"]
        return self.item_text(item)

    def user_profile(self, user: int) -> str:
        return self.dataset.user_text(int(user)) or f"user {user}"

    def wrap(self, instruction: str) -> str:
        return self.templates["wrapper"].format(instruction=instruction)

    def _pick(self, task: str, rng: random.Random | None, template: int | None) -> str:
        options = self.templates[task]
        if isinstance(options, str):
            options = [options]
        if template is not None:
            return options[template % len(options)]
        return options[(rng or random).randrange(len(options))]

    def has_task(self, task: str) -> bool:
        """Whether the data supports ``task`` (text tasks need text, user tasks user codes)."""
        return self.missing_for(task) is None

    def missing_for(self, task: str) -> str | None:
        """What the data lack for ``task``, in words, or ``None`` when nothing is missing."""
        name = self.dataset.name if self.dataset is not None else "the dataset"
        if task in ("user2index", "index2user"):
            lacking = []
            if not self.scid_map.has_users:
                lacking.append("user SCIDs (the tokenizer stage exported item codes only)")
            if self.dataset is None or self.dataset.user_features is None:
                lacking.append(f"user profiles ({name} has no user features)")
            return " and ".join(lacking) or None
        if task in ("item2index", "index2item", "fusionseqrec"):
            if self.dataset is None or self.dataset.item_features is None:
                return f"item text ({name} has no item features such as a title)"
            return None
        return None if task == "seqrec" else f"a task named {task!r}"

    # -- seqrec -----------------------------------------------------------------------------
    def seqrec_prompt(self, user: int, history: Sequence[int], template: int | None = 0,
                      rng: random.Random | None = None,
                      refreshed_for: str | None = None, prefix: int | None = None) -> str:
        """The prompt that asks for the next item after ``history`` (evaluation uses template 0).

        In ``sequence`` mode it is the one-pass prefix followed by the history SCIDs, exactly
        the context a window position sees in training. ``refreshed_for``: the user SCID
        re-encoded from that split's history; ``prefix``: the one before the user's training
        item ``prefix`` (a training position's prompt; see :meth:`user_scid`).
        """
        user_phrase = self.user_phrase(user, refreshed_for, prefix)
        if self.seqrec_mode == "sequence":
            prefix = self.templates["sequence"].format(user=user_phrase)
            return prefix + self.history_string(history)
        text = self._pick("seqrec", rng, template).format(
            user=user_phrase, history=self.history_string(history))
        return self.wrap(text)

    def seqrec(self, user: int, history: Sequence[int], target: int,
               rng: random.Random | None = None, prefix: int | None = None) -> Segments:
        """Per-prefix seqrec example (the paper's form): instruction -> next item SCID.
        ``prefix``: the target's position in the user's training items (its user SCID, see
        :meth:`user_scid`)."""
        text = self._pick("seqrec", rng, None).format(
            user=self.user_phrase(user, prefix=prefix), history=self.history_string(history))
        return [(self.wrap(text), False), (self.item_scid(target), True)]

    def sequence_segments(self, user: int, items: Sequence[int], first_trained: int,
                          prefix: int | None = None) -> Segments:
        """One-pass form: prefix, then each item's SCID; items from ``first_trained`` on train.

        The model sees at item ``j`` exactly the prompt :meth:`seqrec_prompt` would build for
        history ``items[:j]`` (when the window holds at most ``max_history`` earlier items).
        ``prefix``: the first trained item's position in the user's training items (its user
        SCID, see :meth:`user_scid`).
        """
        head = self.templates["sequence"].format(user=self.user_phrase(user, prefix=prefix))
        segs: Segments = [(head, False)]
        for j, item in enumerate(items):
            text = self._item_str[int(item)]
            if j and self._sep:
                text = self._sep + text
            segs.append((text, j >= first_trained))
        return segs

    # -- alignment tasks --------------------------------------------------------------------
    def item2index(self, item: int, rng: random.Random | None = None) -> Segments:
        text = self._pick("item2index", rng, None).format(title=self.item_text(item))
        return [(self.wrap(text), False), (self.item_scid(item), True)]

    def index2item(self, item: int, rng: random.Random | None = None) -> Segments:
        text = self._pick("index2item", rng, None).format(item=self.item_scid(item))
        return [(self.wrap(text), False), (" " + self.item_text(item), True)]

    def user2index(self, user: int, rng: random.Random | None = None) -> Segments:
        text = self._pick("user2index", rng, None).format(profile=self.user_profile(user))
        return [(self.wrap(text), False), (self.user_scid(user), True)]

    def index2user(self, user: int, rng: random.Random | None = None) -> Segments:
        text = self._pick("index2user", rng, None).format(user_id=self.user_scid(user))
        return [(self.wrap(text), False), (" " + self.user_profile(user), True)]

    def fusionseqrec(self, user: int, history: Sequence[int], target: int,
                     rng: random.Random | None = None, prefix: int | None = None) -> Segments:
        """Half the time history SCIDs -> next title, otherwise history titles -> next SCID.
        ``prefix``: as in :meth:`seqrec`."""
        rng = rng or random
        if rng.random() < 0.5:
            text = self._pick("fusionseqrec_title", rng, None).format(
                user=self.user_phrase(user, prefix=prefix),
                history=self.history_string(history))
            return [(self.wrap(text), False), (" " + self.item_title(target), True)]
        titles = ", ".join(self.item_title(i) for i in list(history)[-self.fusion_history:])
        text = self._pick("fusionseqrec_index", rng, None).format(
            user=self.user_phrase(user, prefix=prefix), history_titles=titles)
        return [(self.wrap(text), False), (self.item_scid(target), True)]

    # -- a model's catalogue, for serving without the data -----------------------------------
    def catalog(self) -> dict:
        """What building a next-item prompt and naming the answer need, without the dataset:
        raw item ids and titles (by internal id), raw user ids, and the prompt settings."""
        ds = self.dataset
        return {"format": CATALOG_FORMAT, "dataset": ds.name,
                "items": [str(i) for i in ds.item_ids],
                "titles": [self.item_title(i) for i in range(ds.num_items)],
                "users": [str(u) for u in ds.user_ids] if self._user_str is not None else None,
                "prompt": {"templates": self.templates, "inject_user": self.inject_user,
                           "max_history": self.max_history, "seqrec_mode": self.seqrec_mode}}

    @classmethod
    def from_catalog(cls, catalog: dict, scid_map: SCIDMap) -> PromptBuilder:
        """A prompt-only builder (next-item prompts, titles) from :meth:`catalog`'s dict."""
        if catalog.get("format") != CATALOG_FORMAT:
            raise ValueError(f"not a catalogue of this framework (format "
                             f"{catalog.get('format')!r}, expected {CATALOG_FORMAT!r})")
        if len(catalog["items"]) != scid_map.num_items:
            raise ValueError(f"the catalogue lists {len(catalog['items'])} items, the SCID map "
                             f"{scid_map.num_items}")
        p = catalog["prompt"]
        return cls(None, scid_map, p["templates"], inject_user=p["inject_user"],
                   max_history=p["max_history"], seqrec_mode=p["seqrec_mode"],
                   titles=list(catalog["titles"]))

    # -- tokenizer training text ------------------------------------------------------------
    def text_corpus(self) -> list[str]:
        """Text a from-scratch tokenizer is trained on: item texts, profiles, templates."""
        out = [self.item_text(i) for i in range(self.dataset.num_items)]
        if self.dataset.user_features is not None:
            out += [self.user_profile(u) for u in range(self.dataset.num_users)]
        for value in self.templates.values():
            for t in ([value] if isinstance(value, str) else value or []):
                if isinstance(t, str):
                    # Placeholder-free template text, repeated so its merges are learned.
                    out += [t.replace("{", " ").replace("}", " ")] * 50
        return out


# -- tokenisation ---------------------------------------------------------------------------
def encode_segments(tokenizer, batch: list[Segments], add_eos: bool | list[bool] = False,
                    max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of each example (BOS first; labels -100 outside trained segments).

    All segments of the batch go through the tokenizer in one call (fast tokenizers batch in
    Rust). ``add_eos`` appends EOS (trained) after the last segment; text responses need it so
    generation can stop. ``max_length`` keeps the *last* tokens (the response is at the end).
    """
    flat = [text for segs in batch for text, _ in segs]
    enc = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    out = []
    k = 0
    for b, segs in enumerate(batch):
        ids: list[int] = [bos] if bos is not None else []
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        for _, trained in segs:
            piece = enc[k]
            k += 1
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
        eos_here = add_eos[b] if isinstance(add_eos, list) else add_eos
        if eos_here and eos is not None:
            ids.append(eos)
            labels.append(eos)
        if max_length is not None and len(ids) > max_length:
            ids, labels = ids[-max_length:], labels[-max_length:]
        out.append((ids, labels))
    return out


def collate_encoded(rows: list[tuple[list[int], list[int]]], pad_id: int,
                    pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest row (dynamic padding).

    Returns ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]``, ``labels`` ``[B, T]``
    (-100 on prompt and padding).
    """
    longest = max(len(r[0]) for r in rows)
    if pad_to_multiple_of > 1:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)] = torch.as_tensor(x)
        labels[i, :len(y)] = torch.as_tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_prompts(tokenizer, prompts: list[str],
                   max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompts (BOS first), the input of generation and scoring.

    Returns ``input_ids`` and ``attention_mask``, both ``[B, P]``.
    """
    rows = encode_segments(tokenizer, [[(p, False)] for p in prompts], max_length=max_length)
    longest = max(len(r[0]) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, (x, _) in enumerate(rows):
        ids[i, longest - len(x):] = torch.as_tensor(x)
        mask[i, longest - len(x):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pad_items(lists: list[np.ndarray | list[int]], pad: int = -1) -> torch.Tensor:
    """Right-pad item-id lists into ``[B, H]`` (``pad`` = -1 marks padding)."""
    width = max(1, max((len(x) for x in lists), default=1))
    out = torch.full((len(lists), width), pad, dtype=torch.long)
    for i, x in enumerate(lists):
        if len(x):
            out[i, :len(x)] = torch.as_tensor(np.asarray(x), dtype=torch.long)
    return out
