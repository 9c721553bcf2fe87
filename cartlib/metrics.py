"""Retrieval metrics (recall@k, MRR@k) and the TREC-style run table.

A query may have several relevant items (qrels: one row per relevant item; the built-in
benchmark's are complete). recall@k is trec_eval's `success@k` (a relevant item in the top k) and
MRR@k its `recip_rank` cut at k (1 / rank of the first relevant item).

A metric at cut-off k is **not applicable** to ranked lists shorter than k (a beam-1 row that returns
one item has no recall@10): it is ``None`` in the metrics dict, so ``null`` in metrics.json (JSON has
no NaN), absent from MLflow (only numbers are logged) and NaN, an empty cell, in a pandas table. A
list that ranks the whole gallery (``n_candidates`` ≤ its length) is complete at every cut-off.
"""
from __future__ import annotations

from typing import Collection, NamedTuple, Sequence

import numpy as np
import pandas as pd

RUN_COLUMNS = ["query_id", "rank", "item_id", "score"]


class QueryRelevance(NamedTuple):
    """Qrels grouped by query."""
    query_ids: np.ndarray  # (Q,) object, each query once, in first-appearance order
    relevant: list[frozenset]  # (Q,) the relevant item ids of each query


def group_qrels(qrels: pd.DataFrame) -> QueryRelevance:
    """One entry per query of a qrels frame (query_id, item_id; a row per relevant item)."""
    grouped = qrels.groupby("query_id", sort=False)["item_id"].agg(frozenset)
    return QueryRelevance(grouped.index.to_numpy(dtype=object), grouped.tolist())


def relevance_stats(qrels: pd.DataFrame) -> dict[str, float]:
    """How many items each query has: the mean, and the share of queries with more than one."""
    n = qrels.groupby("query_id", sort=False).size().to_numpy()
    return {"mean_relevant_per_query": float(n.mean()), "share_multi_relevant": float((n > 1).mean())}


def _hits(ranked: np.ndarray, gold) -> np.ndarray:
    """(Q, k) bool: ranked[q, r] is relevant to query q (gold: (Q,) ids, or Q collections of ids)."""
    if len(gold) and isinstance(gold[0], Collection) and not isinstance(gold[0], str):
        return np.array([[x in rel for x in row] for row, rel in zip(ranked.tolist(), gold)], dtype=bool) \
            .reshape(ranked.shape)
    return ranked == np.asarray(gold)[:, None]


def applicable(k: int, depth: int, n_candidates: int | None = None) -> bool:
    """Whether a metric cut at ``k`` can be computed on ranked lists of length ``depth``: the lists
    reach rank k, or they rank every one of the ``n_candidates``."""
    return depth >= k or (n_candidates is not None and depth >= n_candidates)


def retrieval_metrics(ranked: np.ndarray, gold, *, ks: Sequence[int] = (1, 5, 10),
                      mrr_k: int = 10, n_candidates: int | None = None) -> dict[str, float | None]:
    """ranked (Q, k) candidate ids in rank order (any dtype; -1/"" for an empty slot); gold: (Q,)
    the one relevant id of each query, or Q collections (sets) of relevant ids.

    recall_at_k = fraction of queries with a relevant item in the top k (trec_eval success@k);
    mrr_at_10 = mean over queries of 1/rank of the first relevant item within the top 10 (0 if none).
    A cut-off beyond the list length k (the width of ``ranked``, empty slots included) gives None
    (not applicable, see the module docstring), unless the lists cover all ``n_candidates``.
    """
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or len(ranked) != len(gold):
        raise ValueError(f"ranked must be (Q, k) with Q = len(gold) = {len(gold)}, got shape {ranked.shape}")
    if len(gold) == 0:
        raise ValueError("no queries to evaluate")
    hit = _hits(ranked, gold)  # (Q, k)
    first = np.where(hit.any(1), hit.argmax(1) + 1, 0)  # rank of the first relevant item, 0 = missing
    depth = ranked.shape[1]
    out: dict[str, float | None] = {}
    for k in ks:
        out[f"recall_at_{k}"] = float(((first >= 1) & (first <= k)).mean()) \
            if applicable(k, depth, n_candidates) else None
    rr = np.where((first >= 1) & (first <= mrr_k), 1.0 / np.maximum(first, 1), 0.0)
    out[f"mrr_at_{mrr_k}"] = float(rr.mean()) if applicable(mrr_k, depth, n_candidates) else None
    out["n_queries"] = int(len(gold))
    if n_candidates is not None:
        out["n_candidates"] = int(n_candidates)
    return out


def run_table(query_ids: Sequence[str], ranked_item_ids: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """(Q,) ids, (Q, k) item ids and scores → the run.tsv frame (ranks from 1; empty slots dropped)."""
    ranked_item_ids = np.asarray(ranked_item_ids, dtype=object)
    scores = np.asarray(scores, dtype=np.float64)
    q, k = ranked_item_ids.shape
    frame = pd.DataFrame({
        "query_id": np.repeat(np.asarray(query_ids, dtype=object), k),
        "rank": np.tile(np.arange(1, k + 1), q),
        "item_id": ranked_item_ids.reshape(-1),
        "score": np.round(scores.reshape(-1), 6),
    })
    keep = frame["item_id"].notna() & (frame["item_id"] != "") & np.isfinite(frame["score"])
    return frame[keep].reset_index(drop=True)


def metrics_from_run(run: pd.DataFrame, qrels: pd.DataFrame, *, n_candidates: int | None = None,
                     depth: int | None = None) -> dict[str, float | None]:
    """Recompute the metrics from a run table and qrels (what an external evaluator would do):
    every query of the qrels counts, a query absent from the run scores 0. ``depth``: the list length
    the run was cut at (default: its deepest rank), so a top-5 run has no recall@10."""
    top = run.sort_values(["query_id", "rank"]).groupby("query_id")["item_id"].apply(list).to_dict()
    rel = group_qrels(qrels)
    width = depth or max((len(v) for v in top.values()), default=1)
    ranked = np.array([(top.get(x, []) + [""] * width)[:width] for x in rel.query_ids], dtype=object)
    return retrieval_metrics(ranked, rel.relevant, n_candidates=n_candidates)
