"""cartlib.stats: the two-level paired bootstrap against scipy and a brute-force loop; the verdict rules."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from cartlib.stats import (Kind, PairedCI, Verdict, align_seeds, compare, paired_bootstrap, relative,
                           verdict)


def _hits(rng, p, shape):
    return (rng.random(shape) < p).astype(float)


def _loop_bootstrap(a, b, *, n_resamples, seed, batch, confidence=0.95):
    """The definition, one resample at a time, on the draws paired_bootstrap documents."""
    rng = np.random.default_rng(seed)
    q, out = a.shape[1], []
    for start in range(0, n_resamples, batch):
        r = min(batch, n_resamples - start)
        idx = rng.integers(0, q, (r, q), dtype=np.int64)
        sa = rng.integers(0, len(a), (r, len(a))) if len(a) > 1 else np.zeros((r, 1), int)
        sb = rng.integers(0, len(b), (r, len(b))) if len(b) > 1 else np.zeros((r, 1), int)
        for i in range(r):
            mean_a = np.mean([a[s][idx[i]].mean() for s in sa[i]])
            mean_b = np.mean([b[s][idx[i]].mean() for s in sb[i]])
            out.append(mean_a - mean_b)
    alpha = (1 - confidence) / 2
    return np.quantile(out, [alpha, 1 - alpha])


def test_one_seed_each_is_scipys_paired_percentile_bootstrap_draw_for_draw():
    rng = np.random.default_rng(0)
    a, b = _hits(rng, 0.4, 300), _hits(rng, 0.3, 300)
    want = sps.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True, vectorized=True,
                         method="percentile", n_resamples=2000, batch=500, rng=np.random.default_rng(7))
    got = paired_bootstrap(a, b, n_resamples=2000, batch=500, seed=7)
    assert got.low == pytest.approx(want.confidence_interval.low, abs=1e-12)
    assert got.high == pytest.approx(want.confidence_interval.high, abs=1e-12)
    assert got.delta == pytest.approx(a.mean() - b.mean())
    assert (got.n_queries, got.n_seeds_a, got.n_seeds_b) == (300, 1, 1)


def test_two_level_matches_the_brute_force_loop_on_the_same_draws():
    rng = np.random.default_rng(1)
    a, b = _hits(rng, 0.5, (3, 12)), _hits(rng, 0.4, (2, 12))
    got = paired_bootstrap(a, b, n_resamples=300, batch=70, seed=3)
    assert (got.low, got.high) == pytest.approx(tuple(_loop_bootstrap(a, b, n_resamples=300, seed=3, batch=70)),
                                                abs=1e-12)
    assert got.delta == pytest.approx(a.mean() - b.mean())
    # one system with one seed, the other with several
    got = paired_bootstrap(a[:1], b, n_resamples=200, batch=64, seed=4)
    assert (got.low, got.high) == pytest.approx(tuple(_loop_bootstrap(a[:1], b, n_resamples=200, seed=4, batch=64)),
                                                abs=1e-12)


def test_two_level_agrees_with_an_independent_loop_statistically():
    """Another RNG stream, one resample at a time (seeds, then queries): the same interval within noise."""
    rng = np.random.default_rng(2)
    a = _hits(rng, 0.5, (3, 200)) * (rng.random((3, 1)) < 0.7)  # seeds that differ
    b = _hits(rng, 0.4, (3, 200))
    loop = np.random.default_rng(99)
    out = []
    for _ in range(1500):
        sa, sb, idx = loop.integers(0, 3, 3), loop.integers(0, 3, 3), loop.integers(0, 200, 200)
        out.append(a[sa][:, idx].mean() - b[sb][:, idx].mean())
    low, high = np.quantile(out, [0.025, 0.975])
    got = paired_bootstrap(a, b, n_resamples=1500, seed=0)
    assert got.low == pytest.approx(low, abs=0.03) and got.high == pytest.approx(high, abs=0.03)


def test_seed_to_seed_variance_widens_the_interval():
    rng = np.random.default_rng(3)
    base = _hits(rng, 0.5, 2000)
    b = _hits(rng, 0.45, 2000)
    same = np.stack([base, base, base])
    # three seeds whose means differ by several points, same query-level noise
    spread = np.stack([base, np.where(rng.random(2000) < 0.1, 0.0, base), np.maximum(base, rng.random(2000) < 0.1)])
    narrow = paired_bootstrap(same, b, n_resamples=2000)
    wide = paired_bootstrap(spread, b, n_resamples=2000)
    plain = paired_bootstrap(base, b, n_resamples=2000)
    assert narrow.high - narrow.low == pytest.approx(plain.high - plain.low, rel=0.1)
    assert wide.high - wide.low > 1.5 * (narrow.high - narrow.low)


def test_deterministic_given_the_seed_and_fast_at_report_scale():
    rng = np.random.default_rng(4)
    a, b = _hits(rng, 0.4, (3, 5000)), _hits(rng, 0.35, (3, 5000))
    start = time.perf_counter()
    first = paired_bootstrap(a, b, n_resamples=5_000)  # 5,000 queries x 3 seeds: well under a second alone
    assert time.perf_counter() - start < 3.0  # (a shared 2-core machine)
    assert first.low < first.delta < first.high
    small_a, small_b = a[:, :500], b[:, :500]
    assert paired_bootstrap(small_a, small_b, n_resamples=1000) == paired_bootstrap(small_a, small_b, n_resamples=1000)
    assert paired_bootstrap(small_a, small_b, n_resamples=1000, seed=1) != paired_bootstrap(small_a, small_b,
                                                                                            n_resamples=1000)


def test_too_few_queries_give_no_interval_and_mismatched_queries_are_an_error():
    ci = paired_bootstrap([1.0], [0.0])
    assert ci.delta == 1.0 and np.isnan(ci.low) and verdict("higher", ci) == Verdict.NOT_MEASURED
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros(4))


def test_align_seeds_keeps_the_queries_every_run_scored():
    a = [pd.Series({"q1": 1.0, "q2": 0.0, "q3": 1.0}), pd.Series({"q2": 1.0, "q3": 1.0, "q1": 0.0})]
    b = [pd.Series({"q3": 0.0, "q1": 1.0, "q4": 1.0})]
    xa, xb, ids = align_seeds(a, b)
    assert list(ids) == ["q1", "q3"] and xa.tolist() == [[1, 1], [0, 1]] and xb.tolist() == [[1, 0]]
    assert compare(a, b, n_resamples=50).delta == pytest.approx(0.75 - 0.5)


@pytest.mark.parametrize("kind, ci, want", [
    ("higher", (0.01, 0.05), "holds"), ("higher", (-0.05, -0.01), "refuted"), ("higher", (-0.01, 0.05), "inconclusive"),
    ("lower", (-0.05, -0.01), "holds"), ("lower", (0.01, 0.05), "refuted"), ("lower", (-0.05, 0.001), "inconclusive"),
    # "adds little": the whole interval within ±1 pt
    ("equivalent", (-0.008, 0.009), "holds"), ("equivalent", (-0.026, 0.010), "inconclusive"),
    ("equivalent", (-0.05, -0.02), "refuted"), ("equivalent", (0.015, 0.03), "refuted"),
    ("equivalent", (-0.02, 0.02), "inconclusive"),
    # ranking: every gap (oriented: the claimed order = positive) must exclude 0
    ("ranking", (-0.007, 0.021), "inconclusive"), ("ranking", [(0.01, 0.03), (0.002, 0.02)], "holds"),
    ("ranking", [(0.01, 0.03), (-0.01, 0.02)], "inconclusive"), ("ranking", [(0.01, 0.03), (-0.03, -0.01)], "refuted"),
    ("higher", None, "not measured"), ("lower", (float("nan"), float("nan")), "not measured"),
    ("ranking", [], "not measured"),
])
def test_verdict_rules(kind, ci, want):
    assert verdict(kind, ci) == Verdict(want) and str(verdict(Kind(kind), ci)) == want


def test_verdict_reads_a_paired_ci_and_a_margin():
    ci = PairedCI(-0.008, -0.026, 0.010, 1000, 1, 1, 1000, 0.95)
    assert verdict("equivalent", ci) == Verdict.INCONCLUSIVE  # the example: allows −2.6 pt
    assert verdict("equivalent", ci, margin=0.03) == Verdict.HOLDS
    assert verdict("ranking", [ci, ci]) == Verdict.INCONCLUSIVE
    with pytest.raises(ValueError):
        verdict("bigger", (0, 1))


def test_relative_change():
    assert relative(-0.098, 0.123) == pytest.approx(-0.7967, abs=1e-4)
    assert np.isnan(relative(0.1, 0.0)) and np.isnan(relative(0.1, float("nan")))
