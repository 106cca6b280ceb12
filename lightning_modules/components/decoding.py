"""Trie-constrained beam search over item semantic IDs (the serving hot path).

:func:`constrained_beam_search` returns the same items in the same order, with the same scores
(up to float noise), as HF ``model.generate(num_beams=W, num_return_sequences=W,
do_sample=False, max_new_tokens=L, length_penalty=0.0, early_stopping=True,
prefix_allowed_tokens_fn=prefix_allowed_tokens_fn(trie, P))`` when the trie cannot reach EOS,
but much faster:

* each prompt is encoded once (HF encodes it ``W`` times) and its KV cache is then repeated
  to the beams, into a preallocated buffer that new tokens are written into in place and
  whose beam reordering only moves the generated positions (HF concatenates and re-indexes
  the whole cache every step);
* allowed tokens come from the tensorized :class:`ItemTrie` (one gather per step, no Python
  callback per beam) and the top-k runs over the ``W x K_l`` trie children, not ``W x V``;
* history items can be excluded exactly (``exclude_items``): excluded leaves and internal nodes
  whose whole subtree is excluded are masked, so beams never waste width on them.

Scores are sums over the ``L`` steps of ``log_softmax`` over the full vocabulary (float32).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch

try:  # transformers >= 4.54: layered caches
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older transformers: generic cache path only
    DynamicLayer = None

from lightning_modules.components.trie import ItemTrie, is_member, prefix_allowed_tokens_fn

__all__ = ["ItemTrie", "attn_implementation", "constrained_beam_search", "forward_params",
           "prefix_allowed_tokens_fn", "score_items"]

NEG_INF = float("-inf")


def forward_params(model) -> set[str]:
    """Parameter names of the underlying causal LM's ``forward`` (unwraps peft)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


class _BeamLayer(DynamicLayer or object):
    """KV cache layer for beam search over ``W`` beams per prompt, without re-copying the prompt.

    Holds one preallocated buffer ``[B * W, H, P + extra, D]``: the prompt keys/values are
    written once for all beams of a row, new tokens are written in place (no ``torch.cat``),
    and :meth:`reorder_cache` only moves the generated part, which is exact as long as
    ``beam_idx`` permutes beams *within* each prompt's group of ``W`` (the prompt part is the
    same for all of them), as :func:`constrained_beam_search` does.
    """

    def __init__(self, layer: DynamicLayer, beams: int, extra: int) -> None:
        super().__init__()
        keys, values = layer.keys, layer.values  # [B, H, P, D]
        batch, heads, plen, dim = keys.shape
        self.prompt_len = self.length = plen
        total = plen + extra
        self.buf_keys = keys.new_empty(batch * beams, heads, total, dim)
        self.buf_values = values.new_empty(batch * beams, values.shape[1], total, values.shape[3])
        for buf, src in ((self.buf_keys, keys), (self.buf_values, values)):
            buf.view(batch, beams, *buf.shape[1:])[..., :plen, :] = src.unsqueeze(1)
        self.device = keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self.buf_keys[:, :, : self.length]
        self.values = self.buf_values[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.buf_keys[:, :, self.length : end] = key_states
        self.buf_values[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older API passes cache_position
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        gen = slice(self.prompt_len, self.length)
        if self.length > self.prompt_len:
            self.buf_keys[:, :, gen] = self.buf_keys[beam_idx, :, gen]
            self.buf_values[:, :, gen] = self.buf_values[beam_idx, :, gen]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("beam-search cache layers cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError


def _plain_cache(cache) -> bool:
    """Whether every layer of ``cache`` is a plain, in-memory :class:`DynamicLayer`."""
    layers = getattr(cache, "layers", None)
    plain = DynamicLayer is not None and bool(layers) and all(
        type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None
        and layer.keys.dim() == 4 for layer in layers)
    return plain and not getattr(cache, "offloading", False)


def _expand_cache(cache, beams: int, extra: int) -> bool:
    """Repeat a prefill cache to ``beams`` per row; ``True`` if the in-place beam layers are used.

    Plain :class:`DynamicLayer` layers are swapped for :class:`_BeamLayer`; any other cache
    (sliding window, quantized, linear attention, ...) uses its own ``batch_repeat_interleave``
    and later its own ``reorder_cache``.
    """
    if _plain_cache(cache):
        cache.layers = [_BeamLayer(layer, beams, extra) for layer in cache.layers]
        return True
    cache.batch_repeat_interleave(beams)
    return False


def _forward(model, params: set[str], input_ids, attention_mask, position_ids, cache,
             keep_last: bool, all_positions: bool = False):
    """One cached forward; returns ``(log_probs [N, V] float32, cache)`` of the last position
    (``all_positions``: of every position, flattened to ``[B * T, V]``).

    The cache keyword is ``cache`` (transformers 5.x) or ``past_key_values`` (older).
    """
    kwargs = {"cache" if "cache" in params else "past_key_values": cache}
    if keep_last and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, return_dict=True, **kwargs)
    if all_positions:
        logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
    else:
        logits = out.logits[:, -1, :].float()
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return torch.log_softmax(logits, dim=-1), (new_cache if new_cache is not None else cache)


def constrained_beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    trie: ItemTrie,
    num_beams: int = 20,
    exclude_items: torch.Tensor | Sequence[Iterable[int]] | None = None,
    return_tokens: bool = False,
    method: str = "auto",
    node_bias: Sequence[torch.Tensor] | None = None,
):
    """Top ``num_beams`` items per prompt by beam search constrained to the item trie.

    Args:
        model: HF causal LM (or a peft ``PeftModel`` around one) taking ``input_ids``,
            ``attention_mask``, ``position_ids``, ``cache`` (``past_key_values`` before
            transformers 5) and ``use_cache``. Its train/eval mode is left as is (call
            ``model.eval()`` first).
        input_ids: ``LongTensor [B, P]`` left-padded prompts.
        attention_mask: ``[B, P]`` (1 = token, 0 = left padding), or ``None`` for no padding.
        trie: :class:`ItemTrie` of the catalogue (moved in place to ``input_ids``' device
            if it is elsewhere, so later calls find it there).
        num_beams: ``W``, beam width and number of items returned per prompt.
        exclude_items: optional ``LongTensor [B, H]`` item indices never returned for that
            row (history), ``-1`` = padding; or a list of ``B`` iterables of item indices.
        return_tokens: also return the ``[B, W, L]`` generated token ids.
        method: how the beams read the prompt's keys and values (same results either way):
            ``packed`` (default for sdpa/eager attention): the prompt is cached ONCE per row
            and the ``W`` beams of a level are fed as ``W`` tokens of that row, with a 4-D
            mask through which each beam sees the prompt, its own ancestors and itself; the
            cache grows by ``W`` slots per level and nothing is ever copied or reordered.
            ``cache`` (any attention, e.g. flash-attention without 4-D masks): the prompt
            cache is repeated to the ``W`` beams and reordered as beams change parents.
            ``auto`` picks ``packed`` where the model's attention takes 4-D masks; caches
            other than plain :class:`DynamicLayer` ones (e.g. sliding window) always take
            ``cache``.
        node_bias: optional per level ``l`` a ``FloatTensor [trie.num_nodes[l + 1]]`` added to
            the score of every step into a node of depth ``l + 1`` (e.g. ``-alpha`` times
            :meth:`ItemTrie.log_prior`: beams then rank ``log p(item | prompt) - alpha *
            log prior(item)``); the returned scores include it.
    Returns:
        ``items`` ``LongTensor [B, W]``: row indices into ``trie.item_tokens``, best first,
        ``-1`` where fewer than ``W`` items could be returned; ``scores`` ``FloatTensor [B, W]``:
        summed log-probabilities (``-inf`` for the ``-1`` slots); and with ``return_tokens``
        the ``tokens`` ``LongTensor [B, W, L]`` (``-1`` for the empty slots).
    """
    if num_beams < 1:
        raise ValueError("num_beams must be >= 1")
    if method not in ("auto", "packed", "cache"):
        raise ValueError(f"method must be auto, packed or cache, got {method!r}")
    impl = attn_implementation(model)
    if method == "auto":
        method = "packed" if impl in ("sdpa", "eager") else "cache"
    device = input_ids.device
    if trie.device != device:
        trie = trie.to(device)
    batch, prompt_len = input_ids.shape
    width = num_beams
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    dead = None
    if exclude_items is not None:
        if _rows_of(exclude_items) != batch:
            raise ValueError("exclude_items must have one row per prompt")
        dead = trie.dead_keys(exclude_items)
    rows = torch.arange(batch, device=device)

    with torch.inference_mode():
        # 1. encode each prompt once; positions follow the left padding (HF convention)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        params = forward_params(model)
        log_probs, cache = _forward(model, params, input_ids, attention_mask, position_ids,
                                    None, keep_last=True)  # [B, V]
        last_pos = position_ids[:, -1]

        # 2. first level: the root's children, top min(W, K_0) of them
        tokens0 = trie.child_token[0][0]  # [K0]
        nodes0 = trie.child_node[0][0]
        cand = log_probs[:, tokens0]  # [B, K0]
        if node_bias is not None:
            if len(node_bias) != trie.num_levels:
                raise ValueError(f"node_bias needs {trie.num_levels} levels, got "
                                 f"{len(node_bias)}")
            node_bias = [b.to(device=device, dtype=log_probs.dtype) for b in node_bias]
            cand = cand + node_bias[0][nodes0]
        if dead is not None and dead[1].numel():
            keys = rows[:, None] * trie.num_nodes[1] + nodes0
            cand = cand.masked_fill(is_member(dead[1], keys), NEG_INF)
        k = min(width, cand.shape[1])
        beam_scores, pick = cand.topk(k, dim=1)  # [B, k]
        beam_nodes, beam_tokens = nodes0[pick], tokens0[pick]
        if k < width:  # pad with dead beams (score -inf; never produce a finite candidate)
            pad = width - k
            beam_scores = torch.cat([beam_scores, beam_scores.new_full((batch, pad), NEG_INF)], 1)
            beam_nodes = torch.cat([beam_nodes, beam_nodes[:, :1].expand(batch, pad)], 1)
            beam_tokens = torch.cat([beam_tokens, beam_tokens[:, :1].expand(batch, pad)], 1)
        history = [beam_tokens]  # per level [B, W]

        # packed steps append W slots per level to a plain cache; sliding-window, quantized or
        # offloaded caches would drop or transform them, so those take the repeated cache
        packed = method == "packed" and _plain_cache(cache)
        if trie.num_levels > 1 and not packed:
            _expand_cache(cache, width, trie.num_levels - 1)
            beam_mask = attention_mask.repeat_interleave(width, dim=0)  # [B*W, P]
            beam_pos = last_pos.repeat_interleave(width, dim=0)  # [B*W]
            flat_base = (rows * width)[:, None]  # [B, 1]
        # packed: ancestors[j][b, w] = slot (beam index at level j) of beam w's level-j token
        ancestors: list[torch.Tensor] = []

        # 3. deeper levels: expand every beam by its trie children, keep the best W
        for level in range(1, trie.num_levels):
            if packed:
                mask = _packed_step_mask(attention_mask, ancestors, width, impl,
                                         _model_dtype(model))
                pos = (last_pos + level).unsqueeze(1).expand(batch, width)
                log_probs, cache = _forward(model, params, beam_tokens, mask, pos, cache,
                                            keep_last=False, all_positions=True)  # [B*W, V]
            else:
                beam_mask = torch.cat([beam_mask, beam_mask.new_ones(batch * width, 1)], dim=1)
                log_probs, cache = _forward(
                    model, params, beam_tokens.reshape(-1, 1), beam_mask,
                    (beam_pos + level).unsqueeze(1), cache, keep_last=False)  # [B*W, V]
            child = trie.child_node[level][beam_nodes]  # [B, W, K]
            ctok = trie.child_token[level][beam_nodes]
            step = log_probs.view(batch, width, -1).gather(2, ctok)
            if node_bias is not None:
                step = step + node_bias[level][child.clamp(min=0)]
            invalid = child < 0
            if dead is not None and dead[level + 1].numel():
                keys = rows[:, None, None] * trie.num_nodes[level + 1] + child.clamp(min=0)
                invalid |= is_member(dead[level + 1], keys)
            cand = (beam_scores.unsqueeze(2) + step).masked_fill(invalid, NEG_INF)
            kids = cand.shape[2]
            beam_scores, pick = cand.view(batch, -1).topk(width, dim=1)  # W*K >= W always
            src = torch.div(pick, kids, rounding_mode="floor")  # source beam [B, W]
            beam_nodes = child.view(batch, -1).gather(1, pick).clamp(min=0)
            beam_tokens = ctok.view(batch, -1).gather(1, pick)
            history = [h.gather(1, src) for h in history] + [beam_tokens]
            if packed:
                # the new beams' ancestors: those of their source beams, then the source itself
                ancestors = [a.gather(1, src) for a in ancestors] + [src]
            elif level + 1 < trie.num_levels:
                cache.reorder_cache((flat_base + src).reshape(-1))

        alive = torch.isfinite(beam_scores)
        items = torch.where(alive, trie.leaf_item[beam_nodes], torch.full_like(beam_nodes, -1))
        scores = beam_scores.masked_fill(~alive, NEG_INF)
        if not return_tokens:
            return items, scores
        tokens = torch.stack(history, dim=2).masked_fill(~alive.unsqueeze(2), -1)
        return items, scores, tokens


def attn_implementation(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return getattr(config, "_attn_implementation", None) or "sdpa"


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _packed_step_mask(prompt_mask: torch.Tensor, ancestors: list[torch.Tensor], width: int,
                      impl: str, dtype: torch.dtype) -> torch.Tensor:
    """4-D mask ``[B, 1, W, P + (l + 1) W]`` of the packed step at level ``l = len(ancestors)``.

    Key slots: the prompt (``P``, its left padding blocked), then ``W`` slots per fed level.
    Query beam ``w`` sees the prompt, slot ``ancestors[j][b, w]`` of every earlier level ``j``
    and its own slot ``w`` of the level being fed.
    """
    batch, plen = prompt_mask.shape
    device = prompt_mask.device
    levels = len(ancestors) + 1
    gen = torch.zeros(batch, width, levels, width, dtype=torch.bool, device=device)
    for j, anc in enumerate(ancestors):
        gen[:, :, j].scatter_(2, anc.unsqueeze(2), True)
    gen[:, :, -1] = torch.eye(width, dtype=torch.bool, device=device)
    prompt = prompt_mask.bool()[:, None, :].expand(batch, width, plen)
    mask = torch.cat([prompt, gen.reshape(batch, width, levels * width)], dim=2).unsqueeze(1)
    return mask_for_attention(mask, impl, dtype)


def mask_for_attention(mask: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean 4-D mask (True = may attend) in the form ``impl`` reads: as it is for sdpa,
    additive (0 / the dtype's minimum) for eager attention."""
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    return mask


def _rows_of(exclude_items) -> int:
    if isinstance(exclude_items, torch.Tensor):
        return int(exclude_items.shape[0])
    return len(exclude_items)


def score_items(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                item_tokens: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Exhaustive teacher-forced scores of every item for every prompt (reference/tests).

    Args:
        model: HF causal LM.
        input_ids: ``[B, P]`` left-padded prompts; attention_mask: ``[B, P]`` or ``None``.
        item_tokens: ``[N, L]`` vocabulary ids of every item.
        chunk: items scored per forward.
    Returns:
        ``FloatTensor [B, N]``: sum over the ``L`` item tokens of ``log_softmax`` over the
        full vocabulary, the same quantity :func:`constrained_beam_search` returns.
    """
    device = input_ids.device
    item_tokens = item_tokens.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch, prompt_len = input_ids.shape
    num_items, num_levels = item_tokens.shape
    out = torch.empty(batch, num_items, device=device)
    with torch.inference_mode():
        for b in range(batch):
            for s in range(0, num_items, chunk):
                toks = item_tokens[s : s + chunk]
                n = toks.shape[0]
                ids = torch.cat([input_ids[b].expand(n, prompt_len), toks], dim=1)
                mask = torch.cat([attention_mask[b].expand(n, prompt_len),
                                  attention_mask.new_ones(n, num_levels)], dim=1)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                lp = torch.log_softmax(logits[:, prompt_len - 1 : -1].float(), dim=-1)
                out[b, s : s + n] = lp.gather(2, toks.unsqueeze(2)).squeeze(2).sum(1)
    return out
