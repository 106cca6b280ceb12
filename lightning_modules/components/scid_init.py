"""SCID token embeddings initialised from the tokenizer's codebook vectors.

With ``scid_init: random`` the SCID tokens of the LM start as unrelated random rows, and the
model must learn from the SFT data alone that ``<a_12>`` and ``<a_13>`` are near or far. The
RQ-VAE already knows: code ``c`` of level ``l`` is a vector of that level's codebook, and codes
of similar items are close. ``scid_init: codebook`` starts each SCID token's embedding row at
its codebook vector, standardised per level and carried to the model width by a fixed random
projection (seeded), at the scale of the model's own embedding rows, so distances between
codes of one level survive (Johnson-Lindenstrauss) and the LM begins from the tokenizer's
geometry. Levels without a codebook (the de-duplication level) keep their random rows.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lightning_modules.components.scid_map import SCIDMap

SCID_INITS = ("random", "codebook")
_KEY = re.compile(r"^quantizers\.(item|user)\..*codebooks\.codebooks\.(\d+)$")


def tokenizer_checkpoint(tokenizer_dir: str | Path) -> Path:
    """The tokenizer stage's checkpoint (``tokenizer/checkpoints/tokenizer.ckpt``)."""
    ckdir = Path(tokenizer_dir) / "checkpoints"
    path = ckdir / "tokenizer.ckpt"
    if path.is_file():
        return path
    found = sorted(p for p in ckdir.glob("*.ckpt") if p.name != "last.ckpt")
    if not found:
        raise FileNotFoundError(
            f"{path}: not found; scid_init: codebook needs the tokenizer stage's checkpoint "
            f"(re-run the tokenizer stage, or use scid_init: random)")
    return found[-1]


def load_codebooks(path: str | Path) -> dict[str, list[torch.Tensor]]:
    """``{"item": [level 0 [K0, d], ...], "user": [...]}`` from a tokenizer checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
    found: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m:
            found.setdefault(m.group(1), {})[int(m.group(2))] = value.detach().float()
    if "item" not in found:
        raise ValueError(f"{path}: no item codebooks (state_dict keys "
                         f"'quantizers.item....codebooks.codebooks.<level>'); expected a "
                         f"checkpoint of the tokenizer stage")
    return {entity: [levels[i] for i in sorted(levels)] for entity, levels in found.items()}


def init_scid_embeddings(model, tokenizer, scid_map: SCIDMap,
                         codebooks: dict[str, list[torch.Tensor]], seed: int = 0) -> int:
    """Overwrite the input-embedding rows of the SCID tokens that have a codebook vector.

    Returns the number of rows set. The scale is the standard deviation of the embedding
    rows that are not SCID tokens (the model's own initialisation, or a pretrained vocabulary).
    """
    emb = model.get_input_embeddings().weight
    hidden = emb.shape[1]
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[tokenizer.convert_tokens_to_ids(
        scid_map.item_vocabulary() + scid_map.user_vocabulary())] = False
    scale = float(emb.detach()[others].float().std()) if int(others.sum()) > 1 else 0.02
    gen = torch.Generator().manual_seed(int(seed))
    plan = [("item", scid_map.item_prefixes, scid_map.item_codebook_sizes)]
    if scid_map.user_codes is not None:
        plan.append(("user", scid_map.user_prefixes, scid_map.user_codebook_sizes))
    rows, vectors = [], []
    for entity, prefixes, sizes in plan:
        for level, book in enumerate(codebooks.get(entity, [])):
            expected = sizes[level] if level < len(sizes) else 0
            if book.shape[0] != expected:
                raise ValueError(
                    f"{entity} level {level}: the checkpoint's codebook has {book.shape[0]} "
                    f"codes, the SCID map {expected}; the SCID map and the checkpoint come "
                    f"from different tokenizer runs")
            z = book - book.mean(dim=0, keepdim=True)
            z = z / z.std().clamp_min(1e-8)
            proj = torch.randn(book.shape[1], hidden, generator=gen) / book.shape[1] ** 0.5
            vectors.append(z @ proj * scale)
            rows += tokenizer.convert_tokens_to_ids(
                [f"<{prefixes[level]}_{c}>" for c in range(book.shape[0])])
    if not rows:
        return 0
    with torch.no_grad():
        emb[torch.tensor(rows)] = torch.cat(vectors).to(emb.dtype)
    return len(rows)
