"""Tensorized prefix trie over item semantic IDs, for constrained decoding.

An item is a fixed-length sequence of ``L`` vocabulary ids (one per code level). The trie is
stored level by level as padded child tables built once with torch ops, so a decoding step
looks up the allowed continuations of every beam with one gather (no Python per beam):

* level ``l`` (``0 <= l <= L``) has ``num_nodes[l]`` nodes, the distinct length-``l``
  prefixes of the catalogue in lexicographic order (level 0: the root; level ``L``: the items);
* ``child_node[l]``  ``[num_nodes[l], K_l]``: node id (at level ``l + 1``) of each child,
  ``-1`` for padding; children are sorted by token;
* ``child_token[l]`` ``[num_nodes[l], K_l]``: vocabulary id of the edge to that child
  (padding repeats a valid token of the row, so it can be gathered safely);
* ``leaf_item`` ``[num_nodes[L]]``: row of ``item_tokens`` of each leaf.

Exclusion (history items that must never be returned) is represented per batch row as sorted
"dead" keys ``row * num_nodes[l] + node``: a node is dead when every item below it is excluded,
so beams never spend width on subtrees that cannot yield a returnable item.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch


class ItemTrie:
    """Prefix trie of ``item_tokens`` (``LongTensor [num_items, L]``, unique rows).

    Row ``i`` of ``item_tokens`` holds the vocabulary id of item ``i``'s code at every level;
    decoding returns item row indices.
    """

    def __init__(self, item_tokens: torch.Tensor) -> None:
        item_tokens = torch.as_tensor(item_tokens, dtype=torch.long)
        if item_tokens.dim() != 2 or item_tokens.shape[0] == 0 or item_tokens.shape[1] == 0:
            raise ValueError("item_tokens must be a non-empty [num_items, L] tensor")
        if (item_tokens < 0).any():
            raise ValueError("item_tokens must be non-negative vocabulary ids")
        device = item_tokens.device
        tokens = item_tokens.cpu()
        num_items, num_levels = tokens.shape

        # prefix_id[l][i]: node id of item i's length-l prefix (lexicographic order of prefixes)
        prefix_id = [torch.zeros(num_items, dtype=torch.long)]
        num_nodes = [1]
        for level in range(1, num_levels + 1):
            uniq, inverse = torch.unique(tokens[:, :level], dim=0, return_inverse=True)
            prefix_id.append(inverse)
            num_nodes.append(int(uniq.shape[0]))
        if num_nodes[-1] != num_items:
            raise ValueError("item_tokens has duplicate rows: every item needs a unique code path")

        child_node, child_token, subtree_size = [], [], []
        for level in range(num_levels):
            n_par, n_child = num_nodes[level], num_nodes[level + 1]
            # parent and edge token of every child node (all items below a child agree on both)
            parent = torch.empty(n_child, dtype=torch.long)
            parent[prefix_id[level + 1]] = prefix_id[level]
            edge = torch.empty(n_child, dtype=torch.long)
            edge[prefix_id[level + 1]] = tokens[:, level]
            count = torch.bincount(parent, minlength=n_par)
            start = torch.cumsum(count, 0) - count
            # children of a parent are contiguous and sorted by token (lexicographic node order)
            pos = torch.arange(n_child) - start[parent]
            width = int(count.max())
            nodes = torch.full((n_par, width), -1, dtype=torch.long)
            nodes[parent, pos] = torch.arange(n_child)
            toks = edge[torch.where(nodes >= 0, nodes, nodes[:, :1])]
            child_node.append(nodes)
            child_token.append(toks)
            subtree_size.append(torch.bincount(prefix_id[level], minlength=n_par))
        subtree_size.append(torch.ones(num_items, dtype=torch.long))
        leaf_item = torch.empty(num_items, dtype=torch.long)
        leaf_item[prefix_id[num_levels]] = torch.arange(num_items)

        self.item_tokens = tokens
        self.num_levels = num_levels
        self.num_items = num_items
        self.num_nodes = num_nodes
        self.prefix_id = prefix_id
        self.child_node = child_node
        self.child_token = child_token
        self.subtree_size = subtree_size
        self.leaf_item = leaf_item
        self._py_children: dict[tuple[int, ...], list[int]] | None = None
        if device.type != "cpu":
            self.to(device)

    # -- basics ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.item_tokens.device

    @property
    def widths(self) -> list[int]:
        """Maximum branching factor ``K_l`` of every level ``l < L``."""
        return [int(t.shape[1]) for t in self.child_node]

    def to(self, device: torch.device | str) -> ItemTrie:
        """Move every table to ``device`` (in place); returns ``self``."""
        device = torch.device(device)
        self.item_tokens = self.item_tokens.to(device)
        self.prefix_id = [t.to(device) for t in self.prefix_id]
        self.child_node = [t.to(device) for t in self.child_node]
        self.child_token = [t.to(device) for t in self.child_token]
        self.subtree_size = [t.to(device) for t in self.subtree_size]
        self.leaf_item = self.leaf_item.to(device)
        return self

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return (f"ItemTrie(num_items={self.num_items}, levels={self.num_levels}, "
                f"nodes={self.num_nodes[1:]}, widths={self.widths})")

    # -- lookups --------------------------------------------------------------------------
    def lookup(self, seq: torch.Tensor) -> torch.Tensor:
        """Item row of each token sequence, ``-1`` where it is no item.

        Args:
            seq: ``LongTensor [..., L]`` vocabulary ids.
        Returns:
            ``LongTensor [...]`` item indices into ``item_tokens`` or ``-1``.
        """
        seq = torch.as_tensor(seq, dtype=torch.long, device=self.device)
        if seq.shape[-1] != self.num_levels:
            raise ValueError(f"sequences must have {self.num_levels} tokens, got {seq.shape[-1]}")
        lead = seq.shape[:-1]
        flat = seq.reshape(-1, self.num_levels)
        node = torch.zeros(flat.shape[0], dtype=torch.long, device=self.device)
        ok = torch.ones(flat.shape[0], dtype=torch.bool, device=self.device)
        for level in range(self.num_levels):
            nodes = self.child_node[level][node]  # [n, K]
            hit = (self.child_token[level][node] == flat[:, level : level + 1]) & (nodes >= 0)
            ok &= hit.any(dim=1)
            node = nodes.gather(1, hit.long().argmax(dim=1, keepdim=True)).squeeze(1).clamp(min=0)
        item = torch.where(ok, self.leaf_item[node], torch.full_like(node, -1))
        return item.reshape(lead)

    def valid(self, seq: torch.Tensor) -> torch.Tensor:
        """``BoolTensor [...]``: whether each ``[..., L]`` token sequence is an item."""
        return self.lookup(seq) >= 0

    def allowed_tokens(self, prefix: Sequence[int]) -> list[int]:
        """Vocabulary ids that may follow ``prefix`` (a list of ``< L`` ids); ``[]`` if none."""
        if self._py_children is None:
            self._py_children = _children_dict(self.item_tokens.tolist())
        return self._py_children.get(tuple(int(t) for t in prefix), [])

    # -- priors ---------------------------------------------------------------------------
    def log_prior(self, item_weights, smoothing: float = 1.0) -> list[torch.Tensor]:
        """Per level ``l < L``, ``log P(node | parent)`` of every node at depth ``l + 1``
        (``FloatTensor [num_nodes[l + 1]]``), where a node's mass is the summed
        ``item_weights`` (``[num_items]``, e.g. training counts) of the items below it plus
        ``smoothing``; summed along an item's path it is the log-prior of its code."""
        w = torch.as_tensor(item_weights, dtype=torch.float64, device=self.device)
        if w.shape != (self.num_items,) or (w < 0).any() or smoothing <= 0:
            raise ValueError(f"item_weights must be {self.num_items} non-negative values and "
                             f"smoothing > 0, got shape {tuple(w.shape)}, smoothing {smoothing}")
        out = []
        for level in range(self.num_levels):
            n_par, n_child = self.num_nodes[level], self.num_nodes[level + 1]
            mass = torch.zeros(n_child, dtype=torch.float64, device=self.device)
            mass.index_add_(0, self.prefix_id[level + 1], w)
            mass += smoothing
            parent = torch.empty(n_child, dtype=torch.long, device=self.device)
            parent[self.prefix_id[level + 1]] = self.prefix_id[level]
            total = torch.zeros(n_par, dtype=torch.float64, device=self.device)
            total.index_add_(0, parent, mass)
            out.append((mass.log() - total[parent].log()).float())
        return out

    # -- exclusion ------------------------------------------------------------------------
    def dead_keys(self, exclude_items: torch.Tensor | Sequence[Iterable[int]],
                  ) -> list[torch.Tensor]:
        """Sorted keys ``row * num_nodes[l] + node`` of the nodes pruned for each batch row.

        A node at level ``l`` (``1 <= l <= L``) is dead for row ``b`` when every item of its
        subtree is in row ``b`` of ``exclude_items``; at level ``L`` these are exactly the
        excluded items.

        Args:
            exclude_items: ``LongTensor [B, H]`` item indices, negative = padding (or a list of
                ``B`` iterables of item indices). Duplicates are fine.
        Returns:
            ``L + 1`` sorted ``LongTensor`` (index 0, the root level, is always empty).
        """
        excl = _as_padded(exclude_items, self.device)
        keep = excl >= 0
        if (excl >= self.num_items).any():
            raise ValueError("exclude_items holds an index >= num_items")
        rows = torch.arange(excl.shape[0], device=self.device).unsqueeze(1).expand_as(excl)
        pair = torch.unique(rows[keep] * self.num_items + excl[keep])  # distinct (row, item)
        row, item = pair // self.num_items, pair % self.num_items
        dead = [torch.empty(0, dtype=torch.long, device=self.device)]
        for level in range(1, self.num_levels + 1):
            node = self.prefix_id[level][item]
            key, count = torch.unique(row * self.num_nodes[level] + node, return_counts=True)
            full = count == self.subtree_size[level][key % self.num_nodes[level]]
            dead.append(key[full])  # torch.unique returns sorted keys
        return dead


def is_member(sorted_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``BoolTensor`` like ``keys``: whether each key occurs in ``sorted_keys`` (1-D, sorted)."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    pos = torch.searchsorted(sorted_keys, keys.reshape(-1)).clamp(max=sorted_keys.numel() - 1)
    return (sorted_keys[pos] == keys.reshape(-1)).reshape(keys.shape)


def _as_padded(exclude_items, device: torch.device) -> torch.Tensor:
    """``LongTensor [B, H]`` (``-1`` padded) from a tensor or a list of iterables."""
    if isinstance(exclude_items, torch.Tensor):
        excl = exclude_items.to(device=device, dtype=torch.long)
        return excl.reshape(excl.shape[0], -1)
    rows = [list(r) for r in exclude_items]
    width = max((len(r) for r in rows), default=0)
    excl = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            excl[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return excl.to(device)


def _children_dict(item_rows: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    """Python map ``prefix tuple -> sorted allowed next tokens`` over every proper prefix."""
    children: dict[tuple[int, ...], set[int]] = {}
    for row in item_rows:
        for level in range(len(row)):
            children.setdefault(tuple(row[:level]), set()).add(row[level])
    return {k: sorted(v) for k, v in children.items()}


def prefix_allowed_tokens_fn(trie: ItemTrie, prompt_len: int,
                             exclude_items: torch.Tensor | Sequence[Iterable[int]] | None = None,
                             fallback_token: int = 0) -> Callable[[int, torch.Tensor], list[int]]:
    """HF ``generate(prefix_allowed_tokens_fn=...)`` callback for the same constraint.

    Reference/baseline for :func:`constrained_beam_search` (one Python call per beam per step).

    Args:
        trie: the item trie.
        prompt_len: ``P``, width of the (left-padded) prompt batch; generated tokens start there.
        exclude_items: optional ``[B, H]`` (``-1`` padded) items of each batch row to leave out
            (the allowed tokens then follow the trie of the remaining items of that row).
        fallback_token: returned for prefixes outside the trie (only beams HF keeps alive with a
            ~-1e9 or -inf score reach them; HF rejects an empty list).
    Returns:
        ``fn(batch_id, input_ids[P + t]) -> list[int]``.
    """
    base = _children_dict(trie.item_tokens.tolist())
    per_row: dict[int, dict[tuple[int, ...], list[int]]] = {}
    if exclude_items is not None:
        excl = _as_padded(exclude_items, torch.device("cpu"))
        for b in range(excl.shape[0]):
            drop = {int(i) for i in excl[b] if i >= 0}
            if drop:
                keep = [row for i, row in enumerate(trie.item_tokens.tolist()) if i not in drop]
                per_row[b] = _children_dict(keep)

    def fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        table = per_row.get(batch_id, base)
        allowed = table.get(tuple(input_ids[prompt_len:].tolist()))
        return allowed if allowed else [fallback_token]

    return fn
