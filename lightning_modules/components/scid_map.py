"""The SCID map: the discrete semantic-collaborative ID of every item and user.

This is the artifact of the tokenizer stage and the vocabulary of the sft and dpo stages.
Items and users use separate token vocabularies: item level ``l`` code ``c`` is the token
``<{item_prefixes[l]}_{c}>`` (default ``<a_12><b_7><c_201><d_0>``) and user level ``l`` is
``<{user_prefixes[l]}_{c}>`` (default ``<u_3><v_88><w_14><x_0>``).

Load a saved map with :func:`load_scid_map` (``<run_dir>/tokenizer``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

ITEM_PREFIXES = ("a", "b", "c", "d", "e", "f")
USER_PREFIXES = ("u", "v", "w", "x", "y", "z")
SCID_FILE = "scid_map.json"
# Later splits whose prompts may show user codes re-encoded from their own history.
REFRESHED_SPLITS = ("test", "predict")


@dataclass
class SCIDMap:
    """Codes of items (``[num_items, L_items]``) and optionally users (``[num_users, L_users]``).

    ``item_codebook_sizes[l]`` is the number of codes of item level ``l`` (likewise for users);
    row ``i`` of ``item_codes`` belongs to internal item id ``i``.

    ``user_codes`` encode each user from the training history (what training and validation
    prompts show). ``user_refreshed_codes`` optionally holds, per later split, the codes of the
    same users re-encoded from the history that split's prompts show: ``"test"`` (training
    items + the validation item) and ``"predict"`` (+ the test item); same shape and levels.
    """

    item_codes: torch.Tensor
    item_codebook_sizes: list[int]
    user_codes: torch.Tensor | None = None
    user_codebook_sizes: list[int] | None = None
    item_prefixes: tuple[str, ...] = ITEM_PREFIXES
    user_prefixes: tuple[str, ...] = USER_PREFIXES
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)
    user_refreshed_codes: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.item_codes = torch.as_tensor(self.item_codes, dtype=torch.long)
        if self.item_codes.dim() != 2:
            raise ValueError("item_codes must be [num_items, num_levels]")
        if len(self.item_codebook_sizes) != self.item_codes.shape[1]:
            raise ValueError("item_codebook_sizes needs one size per item level")
        if len(self.item_prefixes) < self.item_codes.shape[1]:
            raise ValueError("not enough item prefixes for the number of item levels")
        if self.user_codes is not None:
            self.user_codes = torch.as_tensor(self.user_codes, dtype=torch.long)
            if self.user_codebook_sizes is None or \
                    len(self.user_codebook_sizes) != self.user_codes.shape[1]:
                raise ValueError("user_codebook_sizes needs one size per user level")
            if len(self.user_prefixes) < self.user_codes.shape[1]:
                raise ValueError("not enough user prefixes for the number of user levels")
            if set(self.user_prefixes[: self.user_levels]) & set(
                    self.item_prefixes[: self.item_levels]):
                raise ValueError("item and user vocabularies must use different prefixes")
        refreshed = {}
        for split, codes in (self.user_refreshed_codes or {}).items():
            if split not in REFRESHED_SPLITS:
                raise ValueError(f"user_refreshed_codes: unknown split {split!r}; "
                                 f"expected one of {REFRESHED_SPLITS}")
            if self.user_codes is None:
                raise ValueError("user_refreshed_codes without user_codes")
            codes = torch.as_tensor(codes, dtype=torch.long)
            if codes.shape != self.user_codes.shape:
                raise ValueError(f"user_refreshed_codes[{split!r}] has shape "
                                 f"{tuple(codes.shape)}, expected the user codes' "
                                 f"{tuple(self.user_codes.shape)}")
            sizes = torch.as_tensor(self.user_codebook_sizes)
            if len(codes) and ((codes < 0).any() or (codes >= sizes).any()):
                raise ValueError(f"user_refreshed_codes[{split!r}] holds codes outside the "
                                 f"user codebook sizes {list(self.user_codebook_sizes)}")
            refreshed[split] = codes
        self.user_refreshed_codes = refreshed

    # -- shapes ---------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return int(self.item_codes.shape[0])

    @property
    def item_levels(self) -> int:
        return int(self.item_codes.shape[1])

    @property
    def num_users(self) -> int:
        return 0 if self.user_codes is None else int(self.user_codes.shape[0])

    @property
    def user_levels(self) -> int:
        return 0 if self.user_codes is None else int(self.user_codes.shape[1])

    @property
    def has_users(self) -> bool:
        return self.user_codes is not None

    # -- token strings --------------------------------------------------------------------
    def item_token_list(self, item: int) -> list[str]:
        return [f"<{self.item_prefixes[lvl]}_{int(c)}>"
                for lvl, c in enumerate(self.item_codes[item])]

    def user_token_list(self, user: int, refreshed_for: str | None = None) -> list[str]:
        """Tokens of ``user``'s SCID; ``refreshed_for`` (``"test"``/``"predict"``): the codes
        re-encoded from that split's history (see the class docstring)."""
        if self.user_codes is None:
            raise ValueError("this SCID map has no user codes (users were not tokenized)")
        codes = self.user_codes
        if refreshed_for is not None:
            if refreshed_for not in self.user_refreshed_codes:
                have = sorted(self.user_refreshed_codes) or "none"
                raise ValueError(f"this SCID map has no user codes refreshed for "
                                 f"{refreshed_for!r} (it has: {have}); rerun the sasrec and "
                                 "tokenizer stages with this version to export them")
            codes = self.user_refreshed_codes[refreshed_for]
        return self.user_code_tokens(codes[user])

    def user_code_tokens(self, codes) -> list[str]:
        """Tokens of one row of user codes (``[user_levels]``), e.g. a causal prefix code."""
        return [f"<{self.user_prefixes[lvl]}_{int(c)}>" for lvl, c in enumerate(codes)]

    def item_string(self, item: int) -> str:
        return "".join(self.item_token_list(item))

    def user_string(self, user: int, refreshed_for: str | None = None) -> str:
        return "".join(self.user_token_list(user, refreshed_for))

    def item_vocabulary(self) -> list[str]:
        """Every item token, level by level, code by code."""
        return [f"<{self.item_prefixes[lvl]}_{c}>"
                for lvl, size in enumerate(self.item_codebook_sizes) for c in range(size)]

    def user_vocabulary(self) -> list[str]:
        if self.user_codes is None:
            return []
        return [f"<{self.user_prefixes[lvl]}_{c}>"
                for lvl, size in enumerate(self.user_codebook_sizes) for c in range(size)]

    # -- statistics -----------------------------------------------------------------------
    @staticmethod
    def collision_rate(codes: torch.Tensor) -> float:
        """Share of entities whose full ID is shared with at least one other entity."""
        if codes.numel() == 0:
            return 0.0
        _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
        return float((counts[inverse] > 1).float().mean())

    @staticmethod
    def utilization(codes: torch.Tensor, codebook_sizes: list[int]) -> list[float]:
        """Per level, the share of codebook entries used by at least one entity."""
        return [float(torch.unique(codes[:, lvl]).numel() / size)
                for lvl, size in enumerate(codebook_sizes)]

    def statistics(self) -> dict:
        out = {"items": {"collision_rate": self.collision_rate(self.item_codes),
                         "utilization": self.utilization(self.item_codes,
                                                         self.item_codebook_sizes)}}
        if self.user_codes is not None:
            out["users"] = {"collision_rate": self.collision_rate(self.user_codes),
                            "utilization": self.utilization(self.user_codes,
                                                            self.user_codebook_sizes)}
        return out

    # -- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "align3gr-scid-map/1",
            "fingerprint": self.fingerprint,
            "items": {"codes": self.item_codes.tolist(),
                      "codebook_sizes": list(self.item_codebook_sizes),
                      "prefixes": list(self.item_prefixes[: self.item_levels]),
                      "num_levels": self.item_levels},
            "users": None if self.user_codes is None else {
                "codes": self.user_codes.tolist(),
                "codebook_sizes": list(self.user_codebook_sizes),
                "prefixes": list(self.user_prefixes[: self.user_levels]),
                "num_levels": self.user_levels,
                **({"refreshed_codes": {k: v.tolist()
                                        for k, v in self.user_refreshed_codes.items()}}
                   if self.user_refreshed_codes else {})},
            "meta": self.meta,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``scid_map.json`` into ``directory`` atomically; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SCID_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> SCIDMap:
        if d.get("format") != "align3gr-scid-map/1":
            raise ValueError(f"{source}: not an SCID map (format {d.get('format')!r})")
        users = d.get("users")
        return cls(
            item_codes=torch.tensor(d["items"]["codes"], dtype=torch.long),
            item_codebook_sizes=list(d["items"]["codebook_sizes"]),
            item_prefixes=tuple(d["items"]["prefixes"]),
            user_codes=None if users is None else torch.tensor(users["codes"], dtype=torch.long),
            user_codebook_sizes=None if users is None else list(users["codebook_sizes"]),
            user_prefixes=USER_PREFIXES if users is None else tuple(users["prefixes"]),
            fingerprint=d.get("fingerprint", ""),
            meta=d.get("meta", {}),
            user_refreshed_codes={} if users is None else {
                k: torch.tensor(v, dtype=torch.long)
                for k, v in (users.get("refreshed_codes") or {}).items()},
        )


def load_scid_map(path: str | os.PathLike) -> SCIDMap:
    """Load the SCID map from a tokenizer stage folder (or the ``scid_map.json`` file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / SCID_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no SCID map here; run the 'tokenizer' stage first")
    from lightning_modules.components.artifacts import ArtifactError

    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(path, "the SCID map (JSON)", "tokenizer", err) from err
    try:
        return SCIDMap.from_dict(d, source=str(path))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        detail = str(err).removeprefix(f"{path}: ")
        raise ArtifactError(path, "the SCID map (items, users, codebook sizes)", "tokenizer",
                            detail) from err
