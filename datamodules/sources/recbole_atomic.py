"""RecBole atomic files: ``<name>.inter`` (required), ``<name>.item`` and ``<name>.user``.

Each file is UTF-8, tab-separated, with a header of ``field:type`` columns, e.g.
``user_id:token	item_id:token	rating:float	timestamp:float``. Types: ``token`` (one string),
``token_seq`` (space-separated strings), ``float``, ``float_seq``.

``.inter`` must have ``user_id`` and ``item_id``; ``rating`` and ``timestamp`` are optional.
Item text fields are renamed to the canonical keys (``movie_title`` -> ``title``,
``release_year`` -> ``year``, ``class`` -> ``genres`` joined by ``", "``); other fields keep
their names and their raw text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datamodules.schema import DataError, RecDataset
from datamodules.sources import build_dataset, candidate_dirs

log = logging.getLogger(__name__)

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
USER_FIELD, ITEM_FIELD, RATING_FIELD, TIME_FIELD = "user_id", "item_id", "rating", "timestamp"

# RecBole field name -> canonical feature key.
ITEM_FIELD_NAMES = {"movie_title": "title", "title": "title", "release_year": "year",
                    "year": "year", "class": "genres", "genre": "genres", "genres": "genres"}
# Canonical keys whose token_seq values are lists of labels (joined by ", "), not running text.
LIST_FEATURES = {"genres"}


@dataclass
class AtomicTable:
    """One parsed atomic file: column names, their types and the rows as strings.

    ``rows[r]`` are the fields of data line ``line_numbers[r]`` (1-based, header = line 1).
    """

    path: Path
    names: list[str]
    types: list[str]
    rows: list[list[str]]
    line_numbers: list[int]

    def column(self, name: str) -> int:
        return self.names.index(name)

    def require(self, name: str) -> int:
        if name not in self.names:
            raise DataError(f"{self.path}: missing required column {name!r} in the header "
                            f"(found {', '.join(self.names) or 'no columns'})")
        return self.column(name)

    def floats(self, name: str) -> list[float]:
        """The ``name`` column as floats; a non-numeric value raises with its line number."""
        col = self.column(name)
        out = []
        for row, line in zip(self.rows, self.line_numbers):
            try:
                out.append(float(row[col]))
            except ValueError:
                raise DataError(f"{self.path}:{line}: field {name!r} must be a number, "
                                f"got {row[col]!r}") from None
        return out


def read_atomic(path: str | Path) -> AtomicTable:
    """Read one atomic file; blank lines are skipped.

    Raises:
        DataError: missing file, bad header, or a line with the wrong number of fields.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a RecBole atomic file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}:1: expected a header of field:type columns, got an empty line")
    names, types = [], []
    for col in lines[0].split("\t"):
        name, sep, ftype = col.strip().partition(":")
        if not sep or not name or ftype not in FIELD_TYPES:
            raise DataError(f"{path}:1: header column {col!r} is not name:type with type in "
                            f"{', '.join(FIELD_TYPES)}")
        names.append(name)
        types.append(ftype)
    rows, line_numbers = [], []
    width = len(names)
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != width:
            raise DataError(f"{path}:{lineno}: expected {width} tab-separated fields "
                            f"({', '.join(names)}), got {len(fields)}")
        rows.append(fields)
        line_numbers.append(lineno)
    return AtomicTable(path, names, types, rows, line_numbers)


def locate(dataset: str, data_dir: str | Path | None) -> dict[str, Path | None]:
    """Paths of ``<dataset>.inter`` / ``.item`` / ``.user`` (``None`` for absent optional files).

    Looks in ``data_dir`` and then ``data_dir/<dataset>``.
    """
    if data_dir is None:
        raise DataError(f"dataset {dataset!r}: source 'recbole' needs data_dir holding "
                        f"{dataset}.inter")
    searched = []
    for folder in candidate_dirs(dataset, data_dir):
        inter = folder / f"{dataset}.inter"
        searched.append(str(inter))
        if inter.is_file():
            item, user = folder / f"{dataset}.item", folder / f"{dataset}.user"
            return {"inter": inter, "item": item if item.is_file() else None,
                    "user": user if user.is_file() else None}
    raise DataError(f"dataset {dataset!r}: RecBole interaction file not found; expected "
                    + " or ".join(searched))


def parse(files: dict[str, Path | None], name: str) -> RecDataset:
    """Parse atomic files (as returned by :func:`locate`) into a :class:`RecDataset`."""
    inter = read_atomic(files["inter"])
    user_col, item_col = inter.require(USER_FIELD), inter.require(ITEM_FIELD)
    if not inter.rows:
        raise DataError(f"{inter.path}: no interactions (only a header)")
    user_raw = [_token(inter, r, user_col) for r in range(len(inter.rows))]
    item_raw = [_token(inter, r, item_col) for r in range(len(inter.rows))]
    ratings = inter.floats(RATING_FIELD) if RATING_FIELD in inter.names else None
    timestamps = inter.floats(TIME_FIELD) if TIME_FIELD in inter.names else None

    item_features = None
    if files.get("item") is not None:
        item_features = read_features(read_atomic(files["item"]), ITEM_FIELD, ITEM_FIELD_NAMES)
    user_features = None
    if files.get("user") is not None:
        user_features = read_features(read_atomic(files["user"]), USER_FIELD, {})
    return build_dataset(name, user_raw, item_raw, timestamps=timestamps, ratings=ratings,
                         item_features=item_features, user_features=user_features,
                         meta={"source": "recbole"})


def _token(table: AtomicTable, row: int, col: int) -> str:
    value = table.rows[row][col].strip()
    if not value:
        raise DataError(f"{table.path}:{table.line_numbers[row]}: empty "
                        f"{table.names[col]!r} (expected an id)")
    return value


def read_features(table: AtomicTable, id_field: str,
                  renames: dict[str, str]) -> dict[str, dict[str, str]]:
    """Per raw id, the non-id columns as text, renamed by ``renames``.

    List-valued canonical features (``genres``) from ``token_seq`` columns become
    ``"a, b, c"``; every other value keeps its raw text. A repeated id keeps its first row.
    """
    id_col = table.require(id_field)
    columns = []
    for col, (field, ftype) in enumerate(zip(table.names, table.types)):
        if col == id_col:
            continue
        key = renames.get(field, field)
        columns.append((col, key, ftype == "token_seq" and key in LIST_FEATURES))
    features: dict[str, dict[str, str]] = {}
    duplicates = 0
    for r, row in enumerate(table.rows):
        raw = _token(table, r, id_col)
        if raw in features:
            duplicates += 1
            continue
        feats = {}
        for col, key, is_list in columns:
            value = row[col].strip()
            feats[key] = ", ".join(value.split()) if is_list else value
        features[raw] = feats
    if duplicates:
        log.warning("%s: %d repeated %s rows ignored (first row kept)", table.path, duplicates,
                    id_field)
    return features
