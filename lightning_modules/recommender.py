"""Use a trained model: next-item recommendations from raw item ids, without the run or data.

::

    from lightning_modules.recommender import Recommender

    rec = Recommender.from_pretrained("runs/ml100k/dpo/hf")
    for item in rec.recommend(history=["50", "172", "133"], user="196", k=5):
        print(item["id"], item["title"], round(item["score"], 3))

``from_pretrained`` reads an exported ``hf/`` folder of the sft or dpo stage: the model (or
adapter), its tokenizer with the SCID tokens, ``scid_map.json`` and ``catalog.json`` (raw ids,
titles and the prompt settings the model was trained with). Recommendations come from the same
trie-constrained beam search as the evaluation, so they are always catalogue items.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_modules.components.artifacts import ArtifactError, read_json
from lightning_modules.components.prompts import CATALOG_FILE, PromptBuilder


class Recommender:
    """A trained generative recommender behind plain raw ids (see the module docstring).

    Attributes:
        item_ids / titles: the catalogue, by internal item id.
        user_ids: raw ids of the users the model has SCIDs for (``None``: none).
    """

    def __init__(self, model, catalog: dict, path: Path | None = None) -> None:
        self.model = model.eval()
        self.path = path
        self.prompts = PromptBuilder.from_catalog(catalog, model.scid_map)
        self.item_ids: list[str] = list(catalog["items"])
        self.titles: list[str] = list(catalog["titles"])
        self.user_ids: list[str] | None = catalog.get("users")
        self._item_index = {raw: i for i, raw in enumerate(self.item_ids)}
        self._user_index = {raw: i for i, raw in enumerate(self.user_ids or [])}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        num_beams: int = 20) -> Recommender:
        """Load an exported ``hf/`` folder (``RUN/sft/hf`` or ``RUN/dpo/hf``)."""
        from lightning_modules.generative_recommender import GenerativeRecommender

        path = Path(path)
        if not (path / CATALOG_FILE).exists():
            raise FileNotFoundError(
                f"{path / CATALOG_FILE}: not found; expected an exported model folder "
                f"(RUN/sft/hf or RUN/dpo/hf) written by this version (re-run its stage to "
                f"export one)")
        catalog = read_json(path / CATALOG_FILE)
        model = GenerativeRecommender.from_pretrained_dir(path, trainable=False,
                                                          num_beams=num_beams)
        try:
            rec = cls(model, catalog, path)
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(path / CATALOG_FILE, "the model's catalogue", None, err) from err
        model.model.to(device)
        return rec

    # -- ids ------------------------------------------------------------------------------------
    def item_index(self, raw_ids: Sequence[str]) -> list[int]:
        """Internal ids of raw item ids; a ``KeyError`` listing every unknown one."""
        unknown = [r for r in raw_ids if str(r) not in self._item_index]
        if unknown:
            raise KeyError(f"unknown item id(s) {unknown[:20]}"
                           f"{' ...' if len(unknown) > 20 else ''}: not in the model's "
                           f"catalogue of {len(self.item_ids)} items")
        return [self._item_index[str(r)] for r in raw_ids]

    def user_index(self, raw_id: str | None) -> int | None:
        if raw_id is None:
            return None
        if str(raw_id) not in self._user_index:
            known = "no user SCIDs" if not self.user_ids else f"{len(self.user_ids)} users"
            raise KeyError(f"unknown user id {raw_id!r}: the model has {known}; leave the user "
                           "out to recommend from the history alone")
        return self._user_index[str(raw_id)]

    # -- recommendations ------------------------------------------------------------------------
    def _prompt(self, history: list[int], user: int | None) -> str:
        builder = self.prompts
        if user is None or not builder.inject_user:
            # The user phrase without an ID: the history alone describes the user.
            saved, builder.inject_user = builder.inject_user, False
            try:
                return builder.seqrec_prompt(0, history)
            finally:
                builder.inject_user = saved
        # A known user's SCID from everything known of it, when the model reads refreshed ones.
        return builder.seqrec_prompt(user, history,
                                     refreshed_for=self.model.refreshed_for("predict"))

    @torch.no_grad()
    def recommend_batch(self, histories: Sequence[Sequence[str]],
                        users: Sequence[str | None] | None = None, k: int = 10,
                        exclude_history: bool = True,
                        num_beams: int | None = None) -> list[list[dict]]:
        """Top-``k`` items after each history (raw item ids, oldest first), in one beam search:
        per history a list of ``{"id", "title", "score"}`` (summed log-probability), best
        first. ``num_beams`` (default the model's, at least ``k``) bounds ``k``."""
        if users is not None and len(users) != len(histories):
            raise ValueError(f"{len(users)} users for {len(histories)} histories")
        beams = max(num_beams or self.model.num_beams, 1)
        if not 1 <= k <= beams:
            raise ValueError(f"k must be between 1 and the beam width {beams}, got {k}")
        hists = [self.item_index([str(x) for x in h]) for h in histories]
        idx = [self.user_index(u) for u in (users or [None] * len(hists))]
        if not hists:
            return []
        prompts = [self._prompt(h, u) for h, u in zip(hists, idx)]
        exclude = hists if exclude_history else None
        items, scores = self.model.recommend(prompts, exclude, beams)
        out = []
        for its, scs in zip(items.tolist(), scores.tolist()):
            keep = [(i, s) for i, s in zip(its, scs) if i >= 0][:k]
            out.append([{"id": self.item_ids[i], "title": self.titles[i], "score": float(s)}
                        for i, s in keep])
        return out

    def recommend(self, history: Sequence[str], user: str | None = None, k: int = 10,
                  exclude_history: bool = True, num_beams: int | None = None) -> list[dict]:
        """Top-``k`` items after one history; see :meth:`recommend_batch`."""
        return self.recommend_batch([history], None if user is None else [user], k,
                                    exclude_history, num_beams)[0]
