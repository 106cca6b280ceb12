"""Raw Amazon Reviews 2018 and 2023 files (fixtures written here in the real formats, plain
and gzipped): parsing, HTML cleaning, the default 5-core, clear errors, the pipeline's first
stages, and real-feedback DPO pairs from their ratings."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch

from datamodules.schema import DataError
from datamodules.sources import load_dataset

USERS, ITEMS = 30, 16


def _reviews(seed: int = 0):
    rng = random.Random(seed)
    out = []
    for u in range(USERS):
        for j, item in enumerate(rng.sample(range(ITEMS), 8)):
            out.append((f"U{u:03d}", f"B{item:04d}", rng.choice([1.0, 2.0, 3.0, 4.0, 5.0]),
                        1_500_000_000 + 86_400 * (u * 10 + j)))
    out.append(("LONELY", "B9999", 5.0, 1_600_000_000))  # falls to the 5-core
    return out


def write_2018(folder, gz: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t,
                         "reviewText": "fine"}) for u, i, r, t in _reviews()]
    meta = [repr({"asin": f"B{i:04d}", "title": f"Toy &amp; Game {i}",
                  "description": [f"<p>A <b>fun</b> toy number {i}.</p>"],
                  "brand": "Acme", "categories": [["Toys & Games", "Puzzles"]]})
            for i in range(ITEMS)]
    opener, suffix = (gzip.open, ".gz") if gz else (open, "")
    with opener(folder / f"reviews_Toys_5.json{suffix}", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with opener(folder / f"meta_Toys.json{suffix}", "wt", encoding="utf-8") as f:
        f.write("\n".join(meta) + "\n")
    return folder


def write_2023(folder):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"rating": r, "title": "ok", "text": "fine", "asin": i + "X",
                         "parent_asin": i, "user_id": u, "timestamp": int(t * 1000),
                         "verified_purchase": True}) for u, i, r, t in _reviews(1)]
    meta = [json.dumps({"main_category": "Toys", "title": f"Toy {i}", "store": "Acme",
                        "features": ["small"], "description": [f"Toy&nbsp;{i} <br/>new"],
                        "categories": ["Toys & Games", "Puzzles"], "parent_asin": f"B{i:04d}"})
            for i in range(ITEMS)] + [json.dumps({"parent_asin": "B7777", "title": "unreviewed"})]
    (folder / "Toys.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "meta_Toys.jsonl").write_text("\n".join(meta) + "\n")
    return folder


@pytest.mark.parametrize("writer", [write_2018, write_2023])
def test_both_releases_parse_with_text_ratings_and_the_default_5_core(tmp_path, writer):
    folder = writer(tmp_path / "data")
    data = load_dataset("Toys", source="amazon", data_dir=str(folder),
                        cache_dir=str(tmp_path / "cache"))
    assert data.num_users == USERS and data.num_items == ITEMS  # LONELY and B9999 filtered
    assert data.ratings is not None and set(data.ratings.tolist()) <= {1, 2, 3, 4, 5}
    assert data.timestamps is not None and data.meta["kcore"] == 5
    feats = data.item_features[0]
    text = data.item_text(0)
    assert "<" not in text and "&amp;" not in text and "&nbsp;" not in text
    assert feats["brand"] == "Acme" and "Puzzles" in feats["categories"]
    everything = load_dataset("Toys", source="amazon", data_dir=str(folder),
                              cache_dir=str(tmp_path / "cache"), kcore=0)
    assert everything.num_users == USERS + 1
    # auto finds the reviews too
    assert load_dataset("Toys", data_dir=str(folder), cache_dir=str(tmp_path / "c2")
                        ).num_items == ITEMS


def test_malformed_lines_name_file_and_line(tmp_path):
    folder = write_2023(tmp_path / "data")
    path = folder / "Toys.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = '{"user_id": "U1", "parent_asin": "B0001", "rating": "five", "timestamp": 1}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"Toys\.jsonl:4: rating 'five' is not a number"):
        load_dataset("Toys", source="amazon", data_dir=str(folder),
                     cache_dir=str(tmp_path / "cache"))
    lines[3] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"Toys\.jsonl:4: not a JSON object"):
        load_dataset("Toys", source="amazon", data_dir=str(folder),
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="Amazon reviews file not found"):
        load_dataset("Games", source="amazon", data_dir=str(folder),
                     cache_dir=str(tmp_path / "cache"))


def test_pipeline_first_stages_and_real_feedback_pairs(tmp_path):
    from cli import pipeline
    from datamodules.preference_data import PreferenceDataModule
    from tests.dpo_fixtures import random_scid_map

    folder = write_2018(tmp_path / "data", gz=True)
    spec = tmp_path / "toys.yaml"
    spec.write_text(f"dataset: {{name: Toys, source: amazon, data_dir: {folder}}}\n"
                    "stages:\n  - {name: popular, config: configs/ml100k/popular.yaml}\n"
                    "  - {name: sasrec, config: configs/ml100k/sasrec.yaml}\n")
    run = tmp_path / "run"
    assert pipeline(["--config", str(spec), "--run_dir", str(run), "--trainer.max_epochs=1",
                     "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
                     f"--data.init_args.cache_dir={tmp_path / 'cache'}"]) == 0
    record = json.loads((run / "sasrec" / "stage.json").read_text())
    assert record["num_items"] == ITEMS and record["test"]["recall@10"] >= 0
    # Real feedback: ratings 1-2 of a user's training items are the rejected items.
    random_scid_map(ITEMS, USERS, sizes=(4, 4, 4)).save(run / "tokenizer")
    dm = PreferenceDataModule(dataset="Toys", source="amazon", data_dir=str(folder),
                              cache_dir=str(tmp_path / "cache"), run_dir=str(run), seed=0)
    dm.setup("fit")
    specs = dm.sample_specs(0, "dislike")
    assert specs
    pairs = dm.build_pairs(specs, "dislike", torch.full((len(specs), 4), -1), epoch=0)
    assert len(pairs) > 0 and pairs.stats["pairs"] == len(pairs)
