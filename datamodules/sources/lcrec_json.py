"""LC-Rec / LETTER JSON layout.

Files (``<name>`` is the dataset name):
    ``<name>.inter.json`` — ``{user_index: [item_index, ...]}``, each list in chronological
        order. No timestamps and no ratings: the file order is the chronology.
    ``<name>.item.json`` (optional) — ``{item_index: {"title", "description", "brand",
        "categories", ...}}``. Without it the dataset has no item text (``item_features`` is
        ``None``) and still loads, for collaborative-only tokenization.
    ``<name>.user.json`` (optional) — ``{user_index: {field: value, ...}}`` (a plain string
        value is stored as ``{"profile": value}``).
Other files of the layout (``<name>.index.json``, ...) are not read here.
"""

from __future__ import annotations

import json
from pathlib import Path

from datamodules.schema import DataError, RecDataset
from datamodules.sources import build_dataset, candidate_dirs


def locate(dataset: str, data_dir: str | Path | None) -> dict[str, Path | None]:
    """Paths of ``<dataset>.inter.json`` / ``.item.json`` / ``.user.json`` (optional ones may be
    ``None``), looked up in ``data_dir`` and then ``data_dir/<dataset>``."""
    if data_dir is None:
        raise DataError(f"dataset {dataset!r}: source 'lcrec_json' needs data_dir holding "
                        f"{dataset}.inter.json")
    searched = []
    for folder in candidate_dirs(dataset, data_dir):
        inter = folder / f"{dataset}.inter.json"
        searched.append(str(inter))
        if inter.is_file():
            item, user = folder / f"{dataset}.item.json", folder / f"{dataset}.user.json"
            return {"inter": inter, "item": item if item.is_file() else None,
                    "user": user if user.is_file() else None}
    raise DataError(f"dataset {dataset!r}: LC-Rec interaction file not found; expected "
                    + " or ".join(searched))


def read_json_object(path: str | Path) -> dict:
    """Load a JSON file whose top level must be an object.

    Raises:
        DataError: missing file, malformed JSON (with line, column and character position),
            or a top level that is not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} "
                        f"(char {e.pos}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, "
                        f"got {type(obj).__name__}")
    return obj


def parse(files: dict[str, Path | None], name: str) -> RecDataset:
    """Parse LC-Rec JSON files (as returned by :func:`locate`) into a :class:`RecDataset`."""
    inter_path = files["inter"]
    sequences = read_json_object(inter_path)
    user_raw: list[str] = []
    item_raw: list[str] = []
    for user_key, seq in sequences.items():
        user = _index(user_key, inter_path, f"user key {user_key!r}")
        if not isinstance(seq, list):
            raise DataError(f"{inter_path}: user {user_key!r}: expected a list of item indices, "
                            f"got {type(seq).__name__}")
        for pos, item in enumerate(seq):
            item_raw.append(_index(item, inter_path, f"user {user_key!r}, position {pos}"))
        user_raw.extend([user] * len(seq))
    if not item_raw:
        raise DataError(f"{inter_path}: no interactions (every user list is empty)")

    item_features = None
    if files.get("item") is not None:
        item_features = _features(files["item"], "item")
    user_features = None
    if files.get("user") is not None:
        user_features = _features(files["user"], "user")
    return build_dataset(name, user_raw, item_raw, item_features=item_features,
                         user_features=user_features, meta={"source": "lcrec_json"})


def _index(value, path: Path, where: str) -> str:
    """Raw id of a JSON index: an int or a string of digits, returned as its decimal text."""
    if isinstance(value, bool):  # bool is an int subclass; true/false are no indices
        value = None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return str(int(value))
    raise DataError(f"{path}: {where}: expected an integer index, got {value!r}")


def _features(path: Path, kind: str) -> dict[str, dict[str, str]]:
    records = read_json_object(path)
    out = {}
    for key, record in records.items():
        raw = _index(key, path, f"{kind} key {key!r}")
        if isinstance(record, str):
            out[raw] = {"profile": record}
        elif isinstance(record, dict):
            out[raw] = {str(k): _text(v) for k, v in record.items()}
        else:
            raise DataError(f"{path}: {kind} {key!r}: expected an object of text fields, "
                            f"got {type(record).__name__}")
    return out


def _text(value) -> str:
    """Feature value as text: lists become ``"a, b"``, ``null`` becomes ``""``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return ", ".join(t for t in (_text(v) for v in value) if t)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
