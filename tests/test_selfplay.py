"""Self-play bucketing; regeneration with the policy; 2-process DDP regeneration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dpo_fixtures import data_kwargs, shared_sft_run
from torch.utils.data import DataLoader

from callbacks.selfplay import SelfPlayCallback
from datamodules.preference_data import PairDataset, PreferenceDataModule, collate_pairs
from lightning_modules.components.selfplay import (
    bucket_candidates,
    bucket_name,
    pad_negatives,
    shared_positions,
)
from lightning_modules.preference_aligner import PreferenceAligner, PreferenceStage

# 6 items, 3 code levels.  Target 0 = (1, 2, 3).
ITEM_CODES = torch.tensor([
    [1, 2, 3],  # 0: the target
    [4, 5, 6],  # 1: shares nothing            -> easy
    [1, 5, 6],  # 2: shares level 0            -> medium
    [4, 2, 6],  # 3: shares level 1 (not a prefix, still counts) -> medium
    [1, 2, 6],  # 4: shares levels 0 and 1     -> hard
    [4, 2, 3],  # 5: shares levels 1 and 2     -> hard
])


def test_shared_positions_counts_positions_not_prefixes():
    cand = ITEM_CODES[torch.tensor([[1, 2, 3, 4, 5]])]
    assert shared_positions(cand, ITEM_CODES[torch.tensor([0])]).tolist() == [[0, 1, 1, 2, 2]]


def test_bucket_names():
    assert [bucket_name(k) for k in range(4)] == ["easy", "medium", "hard", "hard"]


def test_bucket_assignment_drops_target_padding_duplicates_and_forbidden():
    candidates = torch.tensor([[5, 0, 1, 3, -1, 2, 4, 1],
                               [1, 2, 3, 4, 5, 0, -1, -1]])
    targets = torch.tensor([0, 1])
    buckets = bucket_candidates(candidates, targets, ITEM_CODES, forbidden=[[], [2, 4]])
    # row 0: beam order kept, target 0, pad and the duplicate 1 dropped
    assert buckets["easy"][0] == [1]
    assert buckets["medium"][0] == [3, 2]
    assert buckets["hard"][0] == [5, 4]
    # row 1: target 1 = (4, 5, 6); 2 and 4 forbidden
    # 3 = (4,2,6) shares 2 -> hard; 5 = (4,2,3) shares 1 -> medium; 0 shares 0 -> easy
    assert buckets["easy"][1] == [0]
    assert buckets["medium"][1] == [5]
    assert buckets["hard"][1] == [3]


def test_pad_negatives():
    ids, mask = pad_negatives([[3, 4, 5], [], [7]], 2)
    assert ids.tolist() == [[3, 4], [-1, -1], [7, -1]]
    assert mask.tolist() == [[True, True], [False, False], [True, False]]


# -- with a (tiny) policy ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_sft_run(tmp_path_factory)


def test_regenerated_pairs_change_after_a_policy_update(run_dir):
    dm = PreferenceDataModule(**data_kwargs(run_dir), num_negatives=8)
    model = PreferenceAligner(run_dir=str(run_dir),
                              stages=[PreferenceStage("sp_all", 1, 1e-2)]).prepare(dm)
    selfplay = SelfPlayCallback(num_beams=16, batch_size=16, progress_bar=False)
    before = selfplay.regenerate(None, model, 0, datamodule=dm)
    again = selfplay.regenerate(None, model, 0, datamodule=dm)
    assert before.as_records() == again.as_records()  # same policy + epoch -> same pairs
    # A few DPO steps on these pairs move the policy ...
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-2)
    for batch in DataLoader(PairDataset(before), batch_size=8, collate_fn=collate_pairs):
        loss, _ = model.preference_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = selfplay.regenerate(None, model, 0, datamodule=dm)
    # ... so the same prompts (same epoch -> same positions) get other negatives.
    assert [s.position for s in after.specs] == [s.position for s in before.specs]
    changed = sum(a != b for a, b in zip(after.as_records(), before.as_records()))
    assert changed >= len(before) // 2
    # Still the same reference (the stage did not change): reference log-probs of the chosen
    # items are unchanged for identical prompts.
    torch.testing.assert_close(after.ref_chosen, before.ref_chosen)


@pytest.mark.parametrize("stage", ["sp_all", "sp_hard"])
def test_reference_from_the_beams_equals_scoring_every_item(run_dir, stage):
    """A freshly opened stage: the beams were searched by the reference itself, so rejected
    items reuse their beam scores; they equal scoring every item again."""
    dm = PreferenceDataModule(**data_kwargs(run_dir), num_negatives=8)
    model = PreferenceAligner(run_dir=str(run_dir),
                              stages=[PreferenceStage(stage, 1, 1e-2)]).prepare(dm)
    selfplay = SelfPlayCallback(num_beams=16, batch_size=16, progress_bar=False)
    pairs = selfplay.regenerate(None, model, 0, datamodule=dm)
    assert len(pairs) > 0
    negatives = int(pairs.rejected_mask.sum())
    assert negatives > 0 and pairs.stats["reference_from_beams"] >= negatives
    items = torch.cat([pairs.chosen.unsqueeze(1), pairs.rejected], dim=1)
    full = model.reference_logps(pairs.prompts, items, items >= 0)
    torch.testing.assert_close(pairs.ref_chosen, full[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pairs.ref_rejected, full[:, 1:], atol=1e-4, rtol=1e-4)
    assert bool((pairs.ref_rejected[pairs.rejected_mask] < 0).all())
    assert bool((pairs.ref_rejected[~pairs.rejected_mask] == 0).all())
    # The same stage again (not fresh): every item is scored; the values agree.
    again = selfplay.regenerate(None, model, 0, datamodule=dm)
    assert "reference_from_beams" not in again.stats
    torch.testing.assert_close(again.ref_rejected, pairs.ref_rejected, atol=1e-4, rtol=1e-4)


def test_ddp_regeneration_equals_single_process(run_dir, tmp_path):
    """2 CPU processes (Lightning DDP, gloo): every rank holds the same pairs, and before
    training they equal the single-process pairs."""
    out = tmp_path / "ddp"
    out.mkdir()
    worker = Path(__file__).resolve().parent / "selfplay_ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(worker), str(run_dir), str(out), "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert set(ranks[0]["epochs"]) == {"0", "1"}
    for epoch in ("0", "1"):  # every rank trains from identical pair sets
        assert ranks[0]["epochs"][epoch] == ranks[1]["epochs"][epoch]

    sys.path.insert(0, str(worker.parent))
    from selfplay_ddp_worker import dump, make

    dm, model, selfplay = make(str(run_dir))
    model.prepare(dm)
    single = dump(selfplay.regenerate(None, model, 0, datamodule=dm))
    ddp = ranks[0]["epochs"]["0"]
    assert ddp["records"] == [list(r[:2]) + [r[2]] for r in single["records"]]
    torch.testing.assert_close(torch.tensor(ddp["ref_chosen"]),
                               torch.tensor(single["ref_chosen"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(ddp["ref_rejected"]),
                               torch.tensor(single["ref_rejected"]), atol=1e-5, rtol=1e-5)
