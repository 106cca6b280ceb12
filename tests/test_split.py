"""Chronological leave-one-out on datasets coming from the sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datamodules.schema import DataError
from datamodules.sources import build_dataset, load_dataset
from datamodules.split import leave_one_out


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def timed(tmp_path):
    """RecBole file whose rows are out of time order, with a timestamp tie.

    user 1: items 10@50, 11@10, 12@30, 13@30 (tie: 12 before 13 in the file), 14@5
        -> chronological 14, 11, 12, 13, 10
    user 2: items 20@1, 21@2 (2 interactions: dropped)
    user 3: item 30@7 (dropped)
    user 4: items 40@3, 41@2, 42@1 -> chronological 42, 41, 40
    """
    rows = [(1, 10, 50), (2, 20, 1), (1, 11, 10), (4, 40, 3), (1, 12, 30), (3, 30, 7),
            (1, 13, 30), (4, 41, 2), (2, 21, 2), (1, 14, 5), (4, 42, 1)]
    text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t{(i % 5) + 1}\t{t}\n" for u, i, t in rows)
    write(tmp_path / "timed.inter", text)
    return load_dataset("timed", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def raw_items(data, items) -> list[str]:
    return [data.item_ids[i] for i in items]


def test_targets_are_the_last_two_by_time_with_ties_in_file_order(timed):
    split = leave_one_out(timed)
    assert [timed.user_ids[u] for u in split.users] == ["1", "4"]
    row = 0  # user "1"
    assert raw_items(timed, split.train_items[row]) == ["14", "11", "12"]
    assert timed.item_ids[split.valid_target[row]] == "13"  # tie at t=30: file order
    assert timed.item_ids[split.test_target[row]] == "10"
    assert raw_items(timed, split.history(row, "test")) == ["14", "11", "12", "13"]
    assert raw_items(timed, split.history(row, "valid", max_history=2)) == ["11", "12"]
    row = 1  # user "4"
    assert raw_items(timed, split.train_items[row]) == ["42"]
    assert timed.item_ids[split.valid_target[row]] == "41"
    assert timed.item_ids[split.test_target[row]] == "40"
    # Ratings travel with their items: rating = item % 5 + 1 in the fixture.
    assert split.valid_rating[0] == 13 % 5 + 1 and split.test_rating[0] == 10 % 5 + 1
    np.testing.assert_array_equal(split.train_ratings[0], [14 % 5 + 1, 11 % 5 + 1, 12 % 5 + 1])


def test_short_users_are_dropped_and_counted(timed):
    split = leave_one_out(timed)
    assert split.num_dropped_users == 2
    stats = split.statistics()
    assert stats["dropped_users"] == 2 and stats["users"] == 2
    assert stats["interactions"] == 8 and stats["train_interactions"] == 4


def test_no_held_out_item_in_any_training_prefix(tmp_path):
    rng = np.random.default_rng(0)
    users, items, times = [], [], []
    for u in range(30):
        n = int(rng.integers(1, 12))
        seq = rng.choice(200, size=n, replace=False)  # no repeats within a user
        users += [str(u)] * n
        items += [str(i) for i in seq]
        times += rng.integers(0, 5, size=n).tolist()  # many ties on purpose
    order = rng.permutation(len(users))  # rows in a shuffled file order
    data = build_dataset("rand", [users[k] for k in order], [items[k] for k in order],
                         timestamps=[times[k] for k in order])
    split = leave_one_out(data)
    assert split.num_dropped_users == sum(users.count(str(u)) < 3 for u in range(30))
    for row, u in enumerate(split.users):
        rows = np.flatnonzero(data.users == u)
        # Expected chronology: time, then position in the file.
        chrono = data.items[rows[np.lexsort((rows, data.timestamps[rows]))]]
        assert split.valid_target[row] == chrono[-2] and split.test_target[row] == chrono[-1]
        np.testing.assert_array_equal(split.train_items[row], chrono[:-2])
        train = set(split.train_items[row].tolist())
        assert split.valid_target[row] not in train and split.test_target[row] not in train
        assert split.test_target[row] not in split.history(row, "test")


def test_lcrec_json_uses_file_order(tmp_path):
    write(tmp_path / "seq.inter.json", json.dumps({"5": [9, 3, 7, 1], "6": [2, 4]}))
    data = load_dataset("seq", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    split = leave_one_out(data)
    assert [data.user_ids[u] for u in split.users] == ["5"] and split.num_dropped_users == 1
    assert raw_items(data, split.train_items[0]) == ["9", "3"]
    assert data.item_ids[split.valid_target[0]] == "7"
    assert data.item_ids[split.test_target[0]] == "1"
    assert split.train_ratings is None and split.valid_rating is None


def test_nothing_to_split(tmp_path):
    write(tmp_path / "short.inter.json", json.dumps({"1": [1, 2], "2": [3]}))
    data = load_dataset("short", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no user has at least 3 interactions"):
        leave_one_out(data)
