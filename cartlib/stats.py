"""Paired intervals over queries and seeds, and the verdict rules of the claims report.

Two systems A and B answered the same test queries; each may have been trained on several seeds.
The quantity of interest is ``Δ = mean_A − mean_B`` of a per-query score (e.g. hit@1 as 0/1), with a
95% interval that accounts for both sources of variation:

**Two-level paired percentile bootstrap** (:func:`paired_bootstrap`). Each resample

1. draws seeds with replacement, for A and B independently (their seeds are different training
   runs, not paired), and averages each system's per-query scores over its drawn seeds;
2. draws queries with replacement, *one* draw shared by A and B (the pair is paired over queries);
3. takes the statistic ``mean_A − mean_B`` over the drawn queries.

The interval is the 2.5th and 97.5th percentile of the resampled statistics (linear interpolation,
as ``numpy.quantile`` and ``scipy.stats.quantile``). With one seed per system step 1 draws nothing,
and the procedure is the ordinary paired query bootstrap of ``scipy.stats.bootstrap(..., paired=True,
method="percentile")``, draw for draw (the tests use it as the oracle). Deterministic given ``seed``.

Verdicts (:func:`verdict`) read the interval of Δ, with the **sign convention that Δ is always the
difference named by the claim** (A − B; for an ablation, ablated − full):

- ``higher`` (the paper says Δ > 0): *holds* iff the interval lies above 0, *refuted* iff below 0;
- ``lower`` (the paper says Δ < 0): *holds* iff the interval lies below 0, *refuted* iff above 0;
- ``equivalent`` (the paper says the difference is negligible): an equivalence test, *holds* iff the
  whole interval lies within ±``margin`` (1 pt = 0.01 by default); *refuted* iff the whole interval
  lies outside it (the data show an effect larger than the margin, either sign); using the 95%
  interval (two one-sided tests at 2.5% each) is slightly conservative against the usual 90% TOST;
- ``ranking`` (the paper ranks rows): the intervals of the gaps between the row and its neighbour(s)
  in the claimed order, each oriented so that the claimed order means gap > 0; *holds* iff every
  interval lies above 0, *refuted* iff any lies below 0;
- everything else is *inconclusive*; an interval that could not be computed is *not measured*.
"""
from __future__ import annotations

import math
from enum import StrEnum
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

METHOD = ("two-level paired percentile bootstrap: seeds resampled with replacement per system, then queries "
          "resampled once for both systems (paired); statistic = mean(A) − mean(B)")
DEFAULT_RESAMPLES = 10_000
DEFAULT_MARGIN = 0.01  # 1 point of recall, for "adds little / no effect" claims


class Kind(StrEnum):
    """What the paper claims about Δ (see the module docstring)."""
    HIGHER = "higher"
    LOWER = "lower"
    EQUIVALENT = "equivalent"
    RANKING = "ranking"


class Verdict(StrEnum):
    HOLDS = "holds"
    REFUTED = "refuted"
    INCONCLUSIVE = "inconclusive"
    NOT_MEASURED = "not measured"


class PairedCI(NamedTuple):
    """Δ = mean_A − mean_B over every seed and the common queries, and its bootstrap interval."""
    delta: float
    low: float
    high: float
    n_queries: int
    n_seeds_a: int
    n_seeds_b: int
    n_resamples: int
    confidence: float


def _as_seeds(x) -> np.ndarray:
    """(S, Q) float64 from an (S, Q) or (Q,) array (one seed)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"per-seed per-query scores must be (seeds, queries), got shape {x.shape}")
    return x


def _seed_means(x: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(R, Q): for each resample, the per-query mean over its drawn seeds ``draws (R, S)``."""
    s = x.shape[0]
    weights = (draws[:, :, None] == np.arange(s)).sum(1, dtype=np.float64) / s  # (R, S)
    return weights @ x


def paired_bootstrap(a, b, *, n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0,
                     batch: int = 500) -> PairedCI:
    """Two-level paired percentile bootstrap of ``mean(a) − mean(b)`` (see the module docstring).

    ``a`` ``(S_A, Q)`` and ``b`` ``(S_B, Q)``: per-seed per-query scores on the same Q queries in the
    same order (a 1-D array is one seed). Resamples go in batches of ``batch``; per batch the random
    draws are, in this order, queries ``integers(0, Q, (batch, Q))``, then seeds of A
    ``integers(0, S_A, (batch, S_A))`` if ``S_A > 1``, then seeds of B likewise.
    """
    a, b = _as_seeds(a), _as_seeds(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must score the same queries: {a.shape[1]} vs {b.shape[1]}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    q = a.shape[1]
    delta = float(a.mean() - b.mean()) if q else float("nan")
    if q < 2:
        return PairedCI(delta, float("nan"), float("nan"), q, len(a), len(b), 0, confidence)
    rng = np.random.default_rng(seed)
    fixed = a[0] - b[0] if len(a) == 1 and len(b) == 1 else None  # one seed each: the plain query bootstrap
    stats = []
    for start in range(0, n_resamples, batch):
        r = min(batch, n_resamples - start)
        idx = rng.integers(0, q, (r, q), dtype=np.int64)
        if fixed is not None:
            stats.append(fixed[idx].mean(1))
            continue
        ma = np.broadcast_to(a[0], (r, q)) if len(a) == 1 else _seed_means(a, rng.integers(0, len(a), (r, len(a))))
        mb = np.broadcast_to(b[0], (r, q)) if len(b) == 1 else _seed_means(b, rng.integers(0, len(b), (r, len(b))))
        stats.append(np.take_along_axis(ma - mb, idx, axis=1).mean(1))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(stats), [alpha, 1 - alpha])
    return PairedCI(delta, float(low), float(high), q, len(a), len(b), n_resamples, confidence)


def align_seeds(a: Sequence[pd.Series], b: Sequence[pd.Series]) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """Per-seed per-query scores (Series indexed by query id, one per seed) of two systems →
    ``(S_A, Q)``, ``(S_B, Q)`` arrays on the queries every one of them scored, in sorted id order."""
    if not len(a) or not len(b):
        raise ValueError("each system needs at least one seed")
    common = a[0].index
    for s in (*a[1:], *b):
        common = common.intersection(s.index)
    common = common.sort_values()
    stack = lambda runs: np.stack([s.loc[common].to_numpy(dtype=np.float64) for s in runs])
    return stack(a), stack(b), common


def compare(a: Sequence[pd.Series], b: Sequence[pd.Series], **kwargs) -> PairedCI:
    """:func:`paired_bootstrap` of two systems given as per-seed per-query Series (see :func:`align_seeds`)."""
    xa, xb, _ = align_seeds(a, b)
    return paired_bootstrap(xa, xb, **kwargs)


def _intervals(kind: Kind, ci) -> list[tuple[float, float]]:
    """``ci`` as a list of ``(low, high)``: one interval, or (ranking) a sequence of them."""
    def one(c) -> tuple[float, float]:
        low, high = (c.low, c.high) if isinstance(c, PairedCI) else c
        return float(low), float(high)

    several = kind is Kind.RANKING and not isinstance(ci, PairedCI) and all(
        isinstance(c, (PairedCI, tuple, list)) for c in ci)
    return [one(c) for c in ci] if several else [one(ci)]


def verdict(kind: Kind | str, ci, *, margin: float = DEFAULT_MARGIN) -> Verdict:
    """The verdict on a claim of ``kind`` from the interval ``ci`` of Δ: a :class:`PairedCI` or a
    ``(low, high)`` pair; for ``ranking`` also a sequence of them, one per gap. ``None``, no interval
    or a NaN bound: *not measured*."""
    kind = Kind(kind)
    bounds = [] if ci is None else _intervals(kind, ci)
    if not bounds or any(math.isnan(lo) or math.isnan(hi) for lo, hi in bounds):
        return Verdict.NOT_MEASURED
    if kind is Kind.EQUIVALENT:
        (lo, hi), = bounds
        if -margin <= lo and hi <= margin:
            return Verdict.HOLDS
        if lo > margin or hi < -margin:
            return Verdict.REFUTED
        return Verdict.INCONCLUSIVE
    if kind is Kind.LOWER:  # orient so that the claim means "above 0"
        bounds = [(-hi, -lo) for lo, hi in bounds]
    if any(hi < 0 for _, hi in bounds):
        return Verdict.REFUTED
    if all(lo > 0 for lo, _ in bounds):
        return Verdict.HOLDS
    return Verdict.INCONCLUSIVE


def relative(delta: float, reference: float) -> float:
    """Δ relative to a reference value (``delta / reference``; NaN when the reference is 0 or missing)."""
    if reference is None or not reference or math.isnan(reference):
        return float("nan")
    return float(delta) / float(reference)
