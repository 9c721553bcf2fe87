"""Batched beam search over identifiers, constrained by the prefix index (CART inference).

CART (Fang et al., ACL 2025) retrieves by generating identifiers: a beam search, constrained by a
prefix tree of the valid identifiers, returns the beams in score order as the ranked list. The
score of an identifier is its log-probability ``Σ_l log p(c_l | c_<l, q)`` with ``p`` the softmax
over level ``l``'s codes (invalid codes are masked *after* the softmax, as transformers'
``prefix_allowed_tokens_fn`` does, so constrained scores are the same numbers exhaustive scoring
gives).

The search is tensors end to end: the batch × beam grid is one tensor, the only Python loop is
over the L levels, every level is one decoder step (KV-cached, encoder-side K/V computed once per
query), one ``allowed`` gather on the prefix index, one ``topk`` over ``(B, W·K)`` and one
``advance``; beams are reordered by ``index_select``. There is no ``.item()`` or other host sync
inside the loop, so CPU and GPU run the same code. Call it with the model in eval mode.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from cartlib.ids.prefix import DEAD, PrefixIndex
from cartlib.model.cart import CartModel, EncoderStates

__all__ = ["GenerationOutput", "constrained_beam_search", "unconstrained_beam_search", "exhaustive_scores"]


class GenerationOutput(NamedTuple):
    """Top-k generated identifiers per query, best first."""

    items: Tensor  # (B, top_k) int64 row of the code table; -1 where fewer valid identifiers exist
    scores: Tensor  # (B, top_k) float32 sum of per-level log-probabilities; -inf where items == -1
    codes: Tensor  # (B, top_k, L) int64 generated codes; -1 where items == -1


def constrained_beam_search(
    model: CartModel, encoded: EncoderStates, prefix_index: PrefixIndex, *, beam: int, top_k: int
) -> GenerationOutput:
    """Beam search that only ever extends valid identifier prefixes (CART inference).

    ``encoded``: :meth:`CartModel.encode` of B queries. ``beam``: beams kept per query;
    ``top_k <= beam``: how many identifiers to return. With ``beam >= N`` the result is the exact
    ranking of all N identifiers (no valid prefix is ever pruned).
    """
    _check(model, encoded, beam=beam, top_k=top_k, n_valid=prefix_index.n_items)
    if tuple(prefix_index.level_sizes) != tuple(model.level_sizes):
        raise ValueError(f"prefix index level sizes {prefix_index.level_sizes} != model's {model.level_sizes}")
    if prefix_index.device != encoded.layers.device:
        raise ValueError(
            f"prefix index is on {prefix_index.device}, encoder states on {encoded.layers.device}: "
            "move the index once with index.to(device)"
        )
    return _beam_search(model, encoded, prefix_index, beam=beam, top_k=top_k, constrained=True)


def unconstrained_beam_search(
    model: CartModel,
    encoded: EncoderStates,
    *,
    beam: int,
    top_k: int,
    prefix_index: PrefixIndex | None = None,
) -> GenerationOutput:
    """The same beam search without the prefix constraint (the throughput floor of decoding).

    Generated identifiers may name no item; with ``prefix_index`` they are looked up after the
    search (``items`` -1 where invalid), without it ``items`` is all -1.
    """
    _check(model, encoded, beam=beam, top_k=top_k, n_valid=math.prod(model.level_sizes))
    out = _beam_search(model, encoded, None, beam=beam, top_k=top_k, constrained=False)
    if prefix_index is None:
        return out
    b, k, depth = out.codes.shape
    with torch.inference_mode():
        items = prefix_index.lookup(out.codes.reshape(b * k, depth)).view(b, k)
    return out._replace(items=items)


def exhaustive_scores(model: CartModel, encoded: EncoderStates, codes: Tensor, *, chunk: int = 1024) -> Tensor:
    """Log-probability of every identifier ``codes (N, L)`` for every query, by teacher forcing.

    Returns ``(B, N)`` float32. The brute-force reference of beam search (cost O(B·N)).
    """
    if encoded.mask.shape[0] == 0:
        raise ValueError("no queries to score (empty batch)")
    codes = codes.to(encoded.layers.device).long()
    b = encoded.mask.shape[0]
    out = []
    with torch.inference_mode():
        memory = model.memory(encoded)
        for lo in range(0, codes.shape[0], chunk):
            c = codes[lo : lo + chunk]  # (n, L)
            grouped = c[None].expand(b, -1, -1)  # (B, n, L): every query scores every identifier
            logits = model.decode(encoded, grouped, memory).logits
            total = torch.zeros(grouped.shape[:2], device=codes.device)
            for l, z in enumerate(logits):
                logp = torch.log_softmax(z.float(), -1)  # (B, n, K_l)
                total = total + logp.gather(-1, grouped[..., l : l + 1]).squeeze(-1)
            out.append(total)
    return torch.cat(out, 1)


def _check(model: CartModel, encoded: EncoderStates, *, beam: int, top_k: int, n_valid: int) -> None:
    if encoded.mask.shape[0] == 0:
        raise ValueError("no queries to decode (empty batch)")
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_k > beam:
        raise ValueError(f"top_k={top_k} exceeds beam={beam}: beam search keeps only `beam` identifiers")
    if top_k > n_valid:
        raise ValueError(f"top_k={top_k} exceeds the number of valid identifiers ({n_valid})")


def _beam_search(
    model: CartModel,
    encoded: EncoderStates,
    index: PrefixIndex | None,
    *,
    beam: int,
    top_k: int,
    constrained: bool,
) -> GenerationOutput:
    b = encoded.mask.shape[0]
    device = encoded.layers.device
    depth = model.depth
    with torch.inference_mode():
        memory = model.memory(encoded)  # encoder-side K/V, once per query
        scores = torch.zeros(b, 1, device=device)  # (B, W): one live beam per query at level 0
        codes = torch.zeros(b, 1, 0, dtype=torch.long, device=device)  # (B, W, l)
        states = index.root(b)[:, None] if constrained else None  # (B, W) prefix-tree nodes
        rows_base = torch.arange(b, device=device)[:, None]
        cache, prev = None, None
        for level in range(depth):
            k = model.level_sizes[level]
            step = model.step(memory, cache, prev, level)
            logp = torch.log_softmax(step.logits.float(), -1)  # (B, W, K)
            w = logp.shape[1]
            if constrained:
                allowed = index.allowed(states.reshape(-1), level).view(b, w, k)
                logp = logp.masked_fill(~allowed, -math.inf)  # dead beams: every code -inf
            cand = (scores[:, :, None] + logp).view(b, w * k)
            w_new = min(beam, w * k)
            scores, flat = cand.topk(w_new, dim=1)  # (B, W'), best first
            parent = torch.div(flat, k, rounding_mode="floor")  # beam each candidate extends
            code = flat - parent * k  # (B, W')
            codes = torch.cat((codes.gather(1, parent[:, :, None].expand(-1, -1, level)), code[:, :, None]), 2)
            if constrained:
                states = index.advance(states.gather(1, parent).reshape(-1), level, code.reshape(-1)).view(b, w_new)
            if level + 1 < depth:  # the last step's cache is never read again
                cache = step.cache.reorder((rows_base * w + parent).reshape(-1))
                prev = code
        scores, codes = scores[:, :top_k], codes[:, :top_k]
        alive = scores > -math.inf  # dead beams (fewer valid identifiers than beams)
        if constrained:
            items = index.item_index(states[:, :top_k].masked_fill(~alive, DEAD))
        else:
            items = torch.full_like(scores, DEAD, dtype=torch.long)
        codes = codes.masked_fill(~alive[:, :, None], DEAD)
    return GenerationOutput(items=items, scores=scores, codes=codes)
