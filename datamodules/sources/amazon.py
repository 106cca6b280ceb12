"""Raw Amazon Reviews files (the papers' data) as a :class:`RecDataset`.

Two releases, plain or gzipped, read line by line (files of several GB are never loaded whole):

- **2018** (McAuley lab): reviews ``<name>.json`` or the 5-core ``<name>_5.json`` /
  ``reviews_<name>_5.json`` (one JSON object per line: ``reviewerID``, ``asin``, ``overall``,
  ``unixReviewTime``), metadata ``meta_<name>.json`` (``asin``, ``title``, ``description``,
  ``brand``, ``category``; the 2014 files write Python literals, also accepted).
- **2023** (Amazon Reviews 2023): reviews ``<name>.jsonl`` (``user_id``, ``parent_asin``,
  ``rating``, ``timestamp`` in ms), metadata ``meta_<name>.jsonl`` (``parent_asin``,
  ``title``, ``description``, ``store``, ``categories``).

Item text: title, brand/store, categories, description, cleaned of HTML. Only items that have
reviews get text (the metadata files list millions more). Ratings are kept, so the
real-feedback DPO stages work (4-5 liked, 1-2 disliked). The papers filter to the 5-core; that
is this source's default ``kcore`` (``load_dataset(kcore=...)`` changes it).
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path

from datamodules.schema import DataError, RecDataset
from datamodules.sources import build_dataset, candidate_dirs

DEFAULT_KCORE = 5
DESCRIPTION_CHARS = 400  # of the description kept in the item text
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def review_names(dataset: str) -> list[str]:
    return [f"{dataset}.jsonl", f"{dataset}.json", f"{dataset}_5.json",
            f"reviews_{dataset}_5.json", f"reviews_{dataset}.json"]


def locate(dataset: str, data_dir: str | Path | None) -> dict[str, Path | None]:
    """``{"reviews": path, "meta": path or None}`` in ``data_dir`` or ``data_dir/<dataset>``
    (each name also as ``.gz``)."""
    if data_dir is None:
        raise DataError(f"dataset {dataset!r}: source 'amazon' needs data_dir holding the "
                        f"reviews ({' or '.join(review_names(dataset))}, optionally .gz)")
    searched = []
    for folder in candidate_dirs(dataset, data_dir):
        for name in review_names(dataset):
            for path in (folder / name, folder / f"{name}.gz"):
                searched.append(str(path))
                if path.is_file():
                    meta = next((m for m in (folder / f"meta_{dataset}.jsonl",
                                             folder / f"meta_{dataset}.jsonl.gz",
                                             folder / f"meta_{dataset}.json",
                                             folder / f"meta_{dataset}.json.gz") if m.is_file()),
                                None)
                    return {"reviews": path, "meta": meta}
    raise DataError(f"dataset {dataset!r}: Amazon reviews file not found; expected "
                    + " or ".join(searched))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from err


def _record(path: Path, lineno: int, line: str, literal_ok: bool) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        obj = None
        if literal_ok:  # the 2014 metadata files are Python literals
            try:
                obj = ast.literal_eval(line.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                obj = None
        if obj is None:
            raise DataError(f"{path}:{lineno}: not a JSON object ({err.msg} at column "
                            f"{err.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(obj: dict, keys: tuple[str, ...], path: Path, lineno: int, what: str):
    for key in keys:
        if obj.get(key) not in (None, ""):
            return obj[key]
    raise DataError(f"{path}:{lineno}: no {what} (expected one of {list(keys)})")


def _number(value, path: Path, lineno: int, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{lineno}: {what} {value!r} is not a number") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise DataError(f"{path}:{lineno}: {what} {value!r} is not a finite number")
    return out


def clean_text(value, limit: int | None = None) -> str:
    """Text of a metadata value (strings or lists of them) without HTML tags and entities."""
    if isinstance(value, (list, tuple)):
        value = " ".join(clean_text(v) for v in value if isinstance(v, (str, list, tuple)))
    if not isinstance(value, str):
        return ""
    text = _SPACE.sub(" ", html.unescape(_TAG.sub(" ", value))).strip()
    return text[:limit].rstrip() if limit and len(text) > limit else text


def _categories(value) -> str:
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        value = value[0]  # 2014: a list of category paths
    if not isinstance(value, list):
        return ""
    return clean_text(" > ".join(v for v in value if isinstance(v, str)))


def parse(files: dict[str, Path | None], name: str) -> RecDataset:
    path = files["reviews"]
    users, items, ratings, times = [], [], [], []
    for lineno, line in _lines(path):
        obj = _record(path, lineno, line, literal_ok=False)
        users.append(str(_field(obj, ("user_id", "reviewerID"), path, lineno, "user id")))
        items.append(str(_field(obj, ("parent_asin", "asin"), path, lineno, "item id")))
        ratings.append(_number(_field(obj, ("rating", "overall"), path, lineno, "rating"),
                               path, lineno, "rating"))
        if "timestamp" in obj:  # 2023: milliseconds
            times.append(_number(obj["timestamp"], path, lineno, "timestamp") / 1000.0)
        else:
            times.append(_number(_field(obj, ("unixReviewTime",), path, lineno, "time"),
                                 path, lineno, "unixReviewTime"))
    if not users:
        raise DataError(f"{path}: no reviews")
    features = None
    if files.get("meta") is not None:
        features = _meta(files["meta"], set(items))
    return build_dataset(name, users, items, timestamps=times, ratings=ratings,
                         item_features=features, meta={"source": "amazon"})


def _meta(path: Path, wanted: set[str]) -> dict[str, dict[str, str]]:
    """Text fields of the reviewed items (others are skipped while streaming)."""
    out: dict[str, dict[str, str]] = {}
    for lineno, line in _lines(path):
        obj = _record(path, lineno, line, literal_ok=True)
        item = obj.get("parent_asin") or obj.get("asin")
        if item is None or str(item) not in wanted:
            continue
        fields = {"title": clean_text(obj.get("title")),
                  "brand": clean_text(obj.get("brand") or obj.get("store")),
                  "categories": _categories(obj.get("categories") or obj.get("category")),
                  "description": clean_text(obj.get("description"), DESCRIPTION_CHARS)}
        out[str(item)] = {k: v for k, v in fields.items() if v}
    return out
