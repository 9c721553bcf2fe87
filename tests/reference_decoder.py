"""Test oracles for :mod:`cartlib.decode`: two beam searches that share no code with it.

- :func:`reference_beam_search`: the former library decoder, kept here only as an oracle: batched,
  driven by the model's own :meth:`CartModel.step` (SDPA attention, the model's fusion modules, its
  KV cache), the same bookkeeping as the paper's constrained decoding.
- :func:`plain_beam_search`: as simple as possible: one query, Python sets of the valid prefixes,
  a fresh teacher-forced forward per beam per level, no cache.
"""
from __future__ import annotations

import math

import torch

from cartlib.decode import GenerationOutput
from cartlib.ids.prefix import DEAD, PrefixIndex
from cartlib.model.cart import CartModel, EncoderStates


def reference_beam_search(model: CartModel, encoded: EncoderStates, index: PrefixIndex | None, *, beam: int,
                          top_k: int) -> GenerationOutput:
    """Batched beam search through ``model.step``; unconstrained when ``index`` is None."""
    b = encoded.mask.shape[0]
    depth = model.depth
    with torch.inference_mode():
        memory = model.memory(encoded)
        scores = torch.zeros(b, 1)
        codes = torch.zeros(b, 1, 0, dtype=torch.long)
        states = index.root(b)[:, None] if index is not None else None
        rows_base = torch.arange(b)[:, None]
        cache, prev = None, None
        for level in range(depth):
            k = model.level_sizes[level]
            step = model.step(memory, cache, prev, level)
            logp = torch.log_softmax(step.logits.float(), -1)
            w = logp.shape[1]
            if index is not None:
                allowed = index.allowed(states.reshape(-1), level).view(b, w, k)
                logp = logp.masked_fill(~allowed, -math.inf)
            cand = (scores[:, :, None] + logp).view(b, w * k)
            w_new = min(beam, w * k)
            scores, flat = cand.topk(w_new, dim=1)
            parent = torch.div(flat, k, rounding_mode="floor")
            code = flat - parent * k
            codes = torch.cat((codes.gather(1, parent[:, :, None].expand(-1, -1, level)), code[:, :, None]), 2)
            if index is not None:
                states = index.advance(states.gather(1, parent).reshape(-1), level, code.reshape(-1)).view(b, w_new)
            if level + 1 < depth:
                cache = step.cache.reorder((rows_base * w + parent).reshape(-1))
                prev = code
        scores, codes = scores[:, :top_k], codes[:, :top_k]
        alive = scores > -math.inf
        if index is not None:
            items = index.item_index(states[:, :top_k].masked_fill(~alive, DEAD))
        else:
            items = torch.full_like(scores, DEAD, dtype=torch.long)
        codes = codes.masked_fill(~alive[:, :, None], DEAD)
    return GenerationOutput(items=items, scores=scores, codes=codes)


def plain_beam_search(model: CartModel, enc: EncoderStates, q: int, codes: torch.Tensor, beam: int, top_k: int):
    """Beam search for query ``q``: Python lists, a fresh teacher-forced forward per beam.
    Returns (rows of ``codes``, scores), best first."""
    one = EncoderStates(enc.layers[:, q : q + 1], enc.mask[q : q + 1])
    depth = codes.shape[1]
    rows = [tuple(r) for r in codes.tolist()]
    prefixes = {r[:l] for r in rows for l in range(depth + 1)}
    beams = [((), 0.0)]
    with torch.no_grad():
        for level in range(depth):
            candidates = []
            for prefix, score in beams:
                padded = torch.tensor([list(prefix) + [0] * (depth - level)])  # causal: padding is unseen
                logp = torch.log_softmax(model.decode(one, padded).logits[level][0], -1)
                for c in range(model.level_sizes[level]):
                    if prefix + (c,) in prefixes:
                        candidates.append((prefix + (c,), score + float(logp[c])))
            beams = sorted(candidates, key=lambda x: -x[1])[:beam]
    return [rows.index(p) for p, _ in beams[:top_k]], [s for _, s in beams[:top_k]]
