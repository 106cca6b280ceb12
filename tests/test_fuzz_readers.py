"""Property-based fuzzing of every data reader: random and malformed files either parse into
a dataset or raise the project's DataError, never another exception (bounded examples)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules.schema import DataError, RecDataset
from datamodules.sources import lcrec_json, movielens, recbole_atomic

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6)
                    | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=6)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=6),
                    max_leaves=30)
# Lines that look almost right: numbers, ids, separators, odd values.
TOKENS = st.sampled_from(["1", "2", "3", "0", "-1", "4.5", "nan", "inf", "", " ", "x", "1e9",
                          "Toy Story (1995)", "01-Jan-1995", "|", "\t", "M", "F"])


def row(sep: str):
    return st.lists(TOKENS, min_size=0, max_size=26).map(sep.join)


def lines(sep: str):
    return st.lists(row(sep), max_size=12).map("\n".join)


def parses_or_data_error(fn) -> None:
    try:
        out = fn()
    except DataError:
        return
    assert isinstance(out, RecDataset)


def _write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@FUZZ
@given(inter=st.one_of(JSON.map(json.dumps), TEXT, st.binary(max_size=200)),
       item=st.none() | JSON.map(json.dumps) | TEXT)
def test_letter_json_reader(inter, item):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {"inter": _write(folder, "D.inter.json", inter),
                 "item": None if item is None else _write(folder, "D.item.json", item),
                 "user": None}
        parses_or_data_error(lambda: lcrec_json.parse(files, "D"))


@FUZZ
@given(header=st.sampled_from(["user_id:token\titem_id:token\ttimestamp:float",
                               "user_id:token\titem_id:token\trating:float\ttimestamp:float",
                               "user_id:token\titem_id:token", "user_id\titem_id",
                               "user_id:token\titem_id:token\ttimestamp:weird", ""]),
       body=lines("\t"), raw=st.none() | st.binary(max_size=200),
       item=st.none() | lines("\t").map(lambda b: "item_id:token\ttitle:token_seq\n" + b))
def test_recbole_atomic_reader(header, body, raw, item):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inter = raw if raw is not None else header + "\n" + body
        files = {"inter": _write(folder, "D.inter", inter),
                 "item": None if item is None else _write(folder, "D.item", item),
                 "user": None}
        parses_or_data_error(lambda: recbole_atomic.parse(files, "D"))


@FUZZ
@given(data=st.one_of(lines("\t"), TEXT), item=st.none() | lines("|"),
       user=st.none() | lines("|"))
def test_movielens_raw_reader(data, item, user):
    parses_or_data_error(lambda: movielens.parse_official(
        ("u.data", data), None if item is None else ("u.item", item),
        None if user is None else ("u.user", user)))
