"""Collision resolution: make every full ID unique (no two items, no two users share one).

Two methods, usable alone or chained (``sinkhorn+dedup``):

- ``sinkhorn``: inside each group of entities that share the first ``L-1`` codes, the entity
  closest to a contested last-level code keeps it; the others move to the group's free last-level
  codes by a Sinkhorn-balanced transport plan on their residual distances (entropic OT with a tiny
  ``eps``, as LC-Rec/LETTER do), rounded greedily to a one-to-one assignment. This keeps IDs at
  ``L`` tokens and every token meaningful. It fails only where a prefix group has more members
  than the last codebook has codes; such a group is spread evenly over the codes.
- ``dedup``: append one level whose code is the entity's rank (by id) among the entities that
  share its full ID (TIGER style); always succeeds, costs one token.

Collision rate = share of entities whose full ID is shared with at least one other entity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_modules.components.scid_map import SCIDMap

collision_rate = SCIDMap.collision_rate


@dataclass
class Resolution:
    """Result of :meth:`CollisionResolver.resolve`.

    Attributes:
        codes: ``[N, L']`` unique IDs (``L' = L + 1`` when a de-duplication level was appended).
        codebook_sizes: per level of ``codes``, the appended level's size = the largest group.
        collision_rate_before, collision_rate_after: see the module docstring.
        reassigned: entities whose last-level code the Sinkhorn step changed.
        appended_level: whether a de-duplication level was appended.
    """

    codes: Tensor
    codebook_sizes: list[int]
    collision_rate_before: float
    collision_rate_after: float
    reassigned: int = 0
    appended_level: bool = False

    def statistics(self) -> dict:
        return {"collision_rate_before": self.collision_rate_before,
                "collision_rate_after": self.collision_rate_after,
                "reassigned": self.reassigned, "appended_level": self.appended_level}


def sinkhorn(cost: Tensor, eps: float = 0.003, iterations: int = 100,
             row_marginal: Tensor | None = None, col_marginal: Tensor | None = None) -> Tensor:
    """Entropic optimal transport plan ``[n, m]`` for ``cost`` ``[n, m]``, computed in the log
    domain so a tiny ``eps`` does not underflow.

    Marginals default to uniform (each row carries ``1/n``, each column receives ``1/m``); both
    must sum to 1. ``cost`` is rescaled to ``[0, 1]`` first, which makes ``eps`` independent of
    the distance scale.
    """
    cost = cost.double()
    cost = (cost - cost.min()) / (cost.max() - cost.min()).clamp_min(1e-12)
    n, m = cost.shape
    log_a = (torch.full((n,), 1.0 / n, dtype=torch.float64) if row_marginal is None
             else row_marginal.double()).log()
    log_b = (torch.full((m,), 1.0 / m, dtype=torch.float64) if col_marginal is None
             else col_marginal.double()).log()
    log_k = -cost / eps
    u = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros(m, dtype=torch.float64)
    for _ in range(iterations):
        u = log_a - torch.logsumexp(log_k + v[None, :], dim=1)
        v = log_b - torch.logsumexp(log_k + u[:, None], dim=0)
    return torch.exp(log_k + u[:, None] + v[None, :])


def assignment_plan(cost: Tensor, eps: float = 0.003, iterations: int = 100) -> Tensor:
    """Sinkhorn plan ``[n, m]`` for moving ``n`` entities onto ``m`` codes of capacity one.

    Balanced OT with uniform marginals would force every entity to spread over ``m / n`` codes
    (with one entity: uniformly, whatever the costs). A zero-cost dummy row (``n < m``) or column
    (``n > m``) absorbs the excess, so each code takes at most one entity and the entities go
    where they fit best; the real part of the plan is returned.
    """
    n, m = cost.shape
    cost = (cost.double() - cost.min()) / (cost.max() - cost.min()).clamp_min(1e-12)
    rows, cols = torch.ones(n, dtype=torch.float64), torch.ones(m, dtype=torch.float64)
    if n < m:
        cost = torch.cat([cost, cost.new_zeros(1, m)])
        rows = torch.cat([rows, rows.new_tensor([m - n])])
    elif n > m:
        cost = torch.cat([cost, cost.new_zeros(n, 1)], dim=1)
        cols = torch.cat([cols, cols.new_tensor([n - m])])
    total = float(max(n, m))
    plan = sinkhorn(cost, eps, iterations, rows / total, cols / total)
    return plan[:n, :m]


def _greedy_round(plan: Tensor) -> list[tuple[int, int]]:
    """One-to-one (row, column) pairs taken by decreasing plan mass."""
    n, m = plan.shape
    taken_rows, taken_cols, pairs = set(), set(), []
    for flat in torch.argsort(plan.flatten(), descending=True).tolist():
        r, c = divmod(flat, m)
        if r in taken_rows or c in taken_cols:
            continue
        pairs.append((r, c))
        taken_rows.add(r)
        taken_cols.add(c)
        if len(pairs) == min(n, m):
            break
    return pairs


def reassign_last_level(codes: Tensor, last_distances: Tensor, eps: float = 0.003,
                        iterations: int = 100) -> tuple[Tensor, int]:
    """Sinkhorn-balanced reassignment of colliding entities' last-level codes.

    Args:
        codes: ``[N, L]`` long.
        last_distances: ``[N, K_last]`` distance of each entity's last-level residual to every
            last-level codeword (lower = better fit).
    Returns:
        the new codes ``[N, L]`` and the number of entities whose code changed.
    """
    original = codes.cpu()
    codes = original.clone()
    last_distances = last_distances.cpu()
    n, num_levels = codes.shape
    num_codes = last_distances.shape[1]
    _, full_inv, full_counts = torch.unique(codes, dim=0, return_inverse=True,
                                            return_counts=True)
    colliding = full_counts[full_inv] > 1
    if not colliding.any():
        return codes, 0
    if num_levels > 1:
        _, prefix_inv = torch.unique(codes[:, :-1], dim=0, return_inverse=True)
    else:
        prefix_inv = torch.zeros(n, dtype=torch.long)
    for group in torch.unique(prefix_inv[colliding]).tolist():
        members = torch.nonzero(prefix_inv == group).flatten()
        last = codes[members, -1]
        own = last_distances[members, last]
        # Sort by (code, distance): the first member of each code is the closest, it keeps it.
        order = torch.argsort(last.double() * (own.max() + 1).double() + own.double(),
                              stable=True)
        first = torch.ones(len(members), dtype=torch.bool)
        first[1:] = last[order][1:] != last[order][:-1]
        movers = members[order[~first]]
        load = torch.bincount(last[order[first]], minlength=num_codes)
        # Fill the least-loaded codes first; a group larger than the codebook then ends up
        # spread evenly (at most ceil(n / K) per code), which keeps a de-dup level small.
        while len(movers):
            free = torch.nonzero(load == load.min()).flatten()
            plan = assignment_plan(last_distances[movers][:, free], eps, iterations)
            placed = torch.zeros(len(movers), dtype=torch.bool)
            for r, c in _greedy_round(plan):
                codes[movers[r], -1] = free[c]
                load[free[c]] += 1
                placed[r] = True
            movers = movers[~placed]
    changed = int((codes != original).any(1).sum())
    return codes, changed


def append_dedup_level(codes: Tensor) -> tuple[Tensor, int]:
    """Append a level: each entity's rank (by id) among entities with the same full ID.

    Returns ``[N, L+1]`` codes and the new level's codebook size (the largest group, ≥ 1).
    """
    codes = codes.cpu()
    _, inv, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(inv, stable=True)  # stable: ties keep entity-id order
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(inv)
    rank[order] = torch.arange(len(inv)) - group_start[inv[order]]
    return torch.cat([codes, rank[:, None]], dim=1), max(int(counts.max()), 1)


class CollisionResolver:
    """Configurable collision resolution (see the module docstring).

    Args:
        method: ``sinkhorn`` (last-level reassignment only; may leave collisions when a prefix
            group outgrows the last codebook), ``dedup`` (appended level only) or
            ``sinkhorn+dedup`` (Sinkhorn first, an appended level for whatever remains).
        eps: Sinkhorn entropy on costs rescaled to [0, 1] (LC-Rec/LETTER use 0.003).
        iterations: Sinkhorn iterations.
        append_level: ``if_needed`` appends the de-duplication level only when collisions remain;
            ``always`` appends it anyway (fixed ID length, e.g. ``<a_..><b_..><c_..><d_0>``).
    """

    def __init__(self, method: Literal["sinkhorn", "dedup", "sinkhorn+dedup"] = "sinkhorn+dedup",
                 eps: float = 0.003, iterations: int = 100,
                 append_level: Literal["if_needed", "always"] = "if_needed") -> None:
        if method not in ("sinkhorn", "dedup", "sinkhorn+dedup"):
            raise ValueError(f"unknown collision method {method!r}")
        if append_level not in ("if_needed", "always"):
            raise ValueError(f"append_level must be 'if_needed' or 'always', got {append_level!r}")
        self.method = method
        self.eps = eps
        self.iterations = iterations
        self.append_level = append_level

    def config(self) -> dict:
        return {"method": self.method, "eps": self.eps, "iterations": self.iterations,
                "append_level": self.append_level}

    def resolve(self, codes: Tensor, codebook_sizes: list[int],
                last_distances: Tensor | None = None) -> Resolution:
        """Unique IDs for ``codes`` ``[N, L]``; Sinkhorn needs ``last_distances``
        ``[N, K_last]``."""
        codes = codes.cpu().long()
        before = collision_rate(codes)
        sizes = list(codebook_sizes)
        reassigned = 0
        if "sinkhorn" in self.method and before > 0:
            if last_distances is None:
                raise ValueError("Sinkhorn collision resolution needs the last level's distances")
            codes, reassigned = reassign_last_level(codes, last_distances, self.eps,
                                                    self.iterations)
        appended = False
        if "dedup" in self.method and (self.append_level == "always" or collision_rate(codes) > 0):
            codes, size = append_dedup_level(codes)
            sizes.append(size)
            appended = True
        return Resolution(codes, sizes, before, collision_rate(codes), reassigned, appended)
