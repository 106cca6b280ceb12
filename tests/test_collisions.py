"""Collision resolution: uniqueness by Sinkhorn reassignment and/or a de-duplication level."""

import pytest
import torch

from lightning_modules.components.collisions import (
    CollisionResolver,
    _greedy_round,
    append_dedup_level,
    assignment_plan,
    collision_rate,
    reassign_last_level,
    sinkhorn,
)


def crafted(big_group: int = 5, num_codes: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[N, 3]`` that collide on purpose and last-level distances ``[N, num_codes]``.

    Entities 0..big_group-1 all share the full ID (0, 0, 0); entities of group (1, 1, *) have
    two pairs of duplicates; the rest are unique.
    """
    torch.manual_seed(0)
    codes = [[0, 0, 0]] * big_group
    codes += [[1, 1, 2], [1, 1, 2], [1, 1, 5], [1, 1, 5], [1, 1, 6]]
    codes += [[2, c % 3, c % num_codes] for c in range(10)]
    codes = torch.tensor(codes)
    distances = torch.rand(len(codes), num_codes) + 1.0
    distances[torch.arange(len(codes)), codes[:, -1]] = torch.rand(len(codes)) * 0.5
    return codes, distances


def unique_rows(codes: torch.Tensor) -> bool:
    return len(torch.unique(codes, dim=0)) == len(codes)


def test_collision_rate_is_the_share_of_entities_with_a_shared_id():
    assert collision_rate(torch.tensor([[0, 1], [0, 1], [1, 1], [2, 0]])) == 0.5
    assert collision_rate(torch.tensor([[0], [1], [2]])) == 0.0
    codes, _ = crafted()
    assert collision_rate(codes) == pytest.approx(9 / 20)


def test_sinkhorn_plan_has_uniform_marginals():
    cost = torch.rand(4, 9)
    plan = sinkhorn(cost, eps=0.05, iterations=500)
    assert torch.allclose(plan.sum(1), torch.full((4,), 1 / 4, dtype=plan.dtype), atol=1e-6)
    assert torch.allclose(plan.sum(0), torch.full((9,), 1 / 9, dtype=plan.dtype), atol=1e-3)


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (4, 4)])
def test_assignment_plan_finds_the_cheapest_one_to_one_assignment(shape):
    linear_sum_assignment = pytest.importorskip("scipy.optimize").linear_sum_assignment
    torch.manual_seed(1)
    cost = torch.rand(*shape)
    plan = assignment_plan(cost)
    assert (plan.sum(0) <= 1 / max(shape) + 1e-4).all()  # capacity one per code
    rows, cols = linear_sum_assignment(cost.numpy())
    best = {(int(r), int(c)) for r, c in zip(rows, cols)}
    assert set(_greedy_round(plan)) == best


def test_sinkhorn_reassignment_makes_ids_unique_and_touches_only_the_last_level():
    codes, distances = crafted()
    new, changed = reassign_last_level(codes, distances)
    assert unique_rows(new)
    assert torch.equal(new[:, :-1], codes[:, :-1])
    # 4 of the 5 identical entities move, and one of each duplicate pair in group (1, 1)
    assert changed == 6 == int((new != codes).any(1).sum())
    # the entity closest to a contested code keeps it
    keeper = int(distances[:5, 0].argmin())
    assert int(new[keeper, -1]) == 0
    assert len(set(new[5:10, -1].tolist())) == 5


def test_sinkhorn_moves_an_entity_to_its_nearest_free_code():
    codes = torch.tensor([[3, 1], [3, 1], [3, 4]])
    distances = torch.tensor([[0.5, 0.1, 0.8, 0.7, 0.6, 0.9],
                              [0.2, 0.5, 0.9, 0.9, 0.1, 0.05],
                              [0.9, 0.9, 0.9, 0.9, 0.0, 0.9]])
    new, changed = reassign_last_level(codes, distances)
    # entity 0 is nearer to code 1 than entity 1 is; entity 1 goes to code 5 (code 4 is taken)
    assert new.tolist() == [[3, 1], [3, 5], [3, 4]] and changed == 1


def test_dedup_level_counts_duplicates_by_entity_id():
    codes, _ = crafted()
    new, size = append_dedup_level(codes)
    assert new.shape == (20, 4) and unique_rows(new)
    assert torch.equal(new[:, :3], codes)
    assert new[:5, 3].tolist() == [0, 1, 2, 3, 4] and size == 5
    assert new[5:10, 3].tolist() == [0, 1, 0, 1, 0]
    assert (new[10:, 3] == 0).all()


@pytest.mark.parametrize("method", ["sinkhorn", "dedup", "sinkhorn+dedup"])
def test_every_method_resolves_the_crafted_collisions(method):
    codes, distances = crafted()
    res = CollisionResolver(method=method).resolve(codes, [3, 3, 8], distances)
    assert unique_rows(res.codes)
    assert res.collision_rate_before == pytest.approx(9 / 20) and res.collision_rate_after == 0
    assert res.appended_level == (method == "dedup")
    assert res.codebook_sizes == ([3, 3, 8, 5] if method == "dedup" else [3, 3, 8])
    assert res.codes.shape[1] == len(res.codebook_sizes)
    for level, size in enumerate(res.codebook_sizes):
        assert int(res.codes[:, level].max()) < size


def test_a_group_larger_than_the_last_codebook_needs_the_dedup_level():
    codes, distances = crafted(big_group=11, num_codes=8)  # 11 identical IDs, 8 last codes
    only_sinkhorn = CollisionResolver(method="sinkhorn").resolve(codes, [3, 3, 8], distances)
    assert only_sinkhorn.collision_rate_after > 0
    both = CollisionResolver(method="sinkhorn+dedup").resolve(codes, [3, 3, 8], distances)
    assert both.appended_level and both.collision_rate_after == 0 and unique_rows(both.codes)
    # Sinkhorn spread the 11 entities evenly over the 8 codes: at most 2 share an ID
    assert both.codebook_sizes == [3, 3, 8, 2]
    assert sorted(torch.bincount(only_sinkhorn.codes[:11, -1], minlength=8).tolist()) == \
        [1] * 5 + [2] * 3


def test_always_appended_level_gives_a_fixed_id_length():
    codes = torch.tensor([[0, 1], [1, 0]])
    res = CollisionResolver(append_level="always").resolve(codes, [2, 2], torch.rand(2, 2))
    assert res.codes.tolist() == [[0, 1, 0], [1, 0, 0]] and res.codebook_sizes == [2, 2, 1]
    res = CollisionResolver().resolve(codes, [2, 2], torch.rand(2, 2))
    assert res.codes.tolist() == [[0, 1], [1, 0]] and not res.appended_level


def test_sinkhorn_without_distances_is_a_clear_error():
    codes, _ = crafted()
    with pytest.raises(ValueError, match="distances"):
        CollisionResolver(method="sinkhorn").resolve(codes, [3, 3, 8])
    with pytest.raises(ValueError, match="unknown collision method"):
        CollisionResolver(method="random")
