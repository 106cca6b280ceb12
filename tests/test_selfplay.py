"""Self-play bucketing; regeneration with the policy; 2-process DDP regeneration."""

import torch

from lightning_modules.components.selfplay import (
    bucket_candidates,
    bucket_name,
    pad_negatives,
    shared_positions,
)

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
