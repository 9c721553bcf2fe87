"""Codebook health of an identifier table: usage, perplexity, collisions (pure numpy, no I/O).

RQ-VAE codebook collapse (every item mapped to a handful of codes) is the failure these numbers
expose; every identifiers run logs them.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _usage(codes: np.ndarray, size: int) -> tuple[float, float]:
    """(N,) codes of one level -> (fraction of the level's codes used, exp(entropy) of usage)."""
    counts = np.bincount(codes, minlength=size)
    p = counts[counts > 0] / counts.sum()
    return float((counts > 0).sum() / size), float(np.exp(-(p * np.log(p)).sum()))


def identifier_health(
    codes: object,
    level_sizes: Sequence[int],
    *,
    has_unique_token: bool = True,
    reconstruction_rel_error: float | None = None,
    fit_seconds: float | None = None,
) -> dict[str, float]:
    """Health metrics of an (N, L) identifier table, as a flat {name: number} dict.

    CART, Fang et al., ACL 2025, identifier `(k, v_1..v_M, u)`. With `has_unique_token`
    (every scheme but atomic) the last column is `u` and the "prefix" is the columns before it.
    Keys:
      collision_rate        fraction of items whose prefix is shared with another item
      max_items_per_prefix  largest number of items with one prefix
      unique_token_p99      99th percentile of u (the smallest u that ≥ 99% of items do not exceed)
      code_usage_l<i>       fraction of level i's codes used (levels before the unique token)
      perplexity_l<i>       exp(entropy) of level i's code usage, natural log (1 = collapse)
      level_size_l<i>       codebook size of every level i, the unique token's included (for a
                            fitted table, u's size = max_items_per_prefix)
      n_items, identifier_length
      reconstruction_rel_error, fit_seconds   only when given
    """
    c = np.asarray(codes)
    sizes = tuple(int(s) for s in level_sizes)
    if c.ndim != 2 or c.shape[1] != len(sizes):
        raise ValueError(f"codes must have shape (N, L={len(sizes)}) for level_sizes {sizes}; "
                         f"got shape {c.shape}")
    if c.shape[0] == 0:
        raise ValueError("codes is empty: no items to measure")
    c = c.astype(np.int64)
    bad = (c < 0) | (c >= np.asarray(sizes))
    if bad.any():
        row, level = np.argwhere(bad)[0]
        raise ValueError(f"code {c[row, level]} at item {row}, level {level} is outside "
                         f"[0, {sizes[level]})")
    n, length = c.shape
    n_semantic = length - 1 if has_unique_token else length
    prefix = c[:, :n_semantic]
    if n_semantic > 0:
        _, inv, counts = np.unique(prefix, axis=0, return_inverse=True, return_counts=True)
        per_item = counts[inv.reshape(-1)]  # (N,) items sharing this item's prefix
    else:  # a table of only unique tokens: every item shares the empty prefix
        per_item = np.full(n, n)
    out: dict[str, float] = {
        "collision_rate": float((per_item > 1).mean()),
        "max_items_per_prefix": int(per_item.max()),
        "unique_token_p99": (float(np.percentile(c[:, -1], 99, method="inverted_cdf"))
                             if has_unique_token else 0.0),
    }
    for level in range(n_semantic):
        usage, ppl = _usage(c[:, level], sizes[level])
        out[f"code_usage_l{level}"] = usage
        out[f"perplexity_l{level}"] = ppl
    for level, size in enumerate(sizes):
        out[f"level_size_l{level}"] = size
    out["n_items"] = n
    out["identifier_length"] = length
    if reconstruction_rel_error is not None:
        out["reconstruction_rel_error"] = float(reconstruction_rel_error)
    if fit_seconds is not None:
        out["fit_seconds"] = float(fit_seconds)
    return out
