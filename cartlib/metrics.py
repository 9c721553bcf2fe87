"""Retrieval metrics (recall@k, MRR@k) and the TREC-style run table.

Each query has exactly one relevant item (qrels), as in Flickr30K/COCO caption→image retrieval.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

RUN_COLUMNS = ["query_id", "rank", "item_id", "score"]


def retrieval_metrics(ranked: np.ndarray, gold: np.ndarray, *, ks: Sequence[int] = (1, 5, 10),
                      mrr_k: int = 10, n_candidates: int | None = None) -> dict[str, float]:
    """ranked (Q, k) candidate ids in rank order (any dtype; -1/"" for an empty slot), gold (Q,).

    recall_at_k = fraction of queries whose relevant item is in the top k;
    mrr_at_10 = mean over queries of 1/rank of the relevant item within the top 10 (0 if absent).
    """
    ranked = np.asarray(ranked)
    gold = np.asarray(gold)
    if ranked.ndim != 2 or len(ranked) != len(gold):
        raise ValueError(f"ranked must be (Q, k) with Q = len(gold) = {len(gold)}, got shape {ranked.shape}")
    if len(gold) == 0:
        raise ValueError("no queries to evaluate")
    hit = ranked == gold[:, None]  # (Q, k)
    first = np.where(hit.any(1), hit.argmax(1) + 1, 0)  # rank of the relevant item, 0 = missing
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall_at_{k}"] = float(((first >= 1) & (first <= k)).mean())
    rr = np.where((first >= 1) & (first <= mrr_k), 1.0 / np.maximum(first, 1), 0.0)
    out[f"mrr_at_{mrr_k}"] = float(rr.mean())
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


def metrics_from_run(run: pd.DataFrame, qrels: pd.DataFrame, *, n_candidates: int | None = None) -> dict[str, float]:
    """Recompute the metrics from a run table and qrels (what an external evaluator would do)."""
    top = run.sort_values(["query_id", "rank"]).groupby("query_id")["item_id"].apply(list).to_dict()
    q = qrels["query_id"].tolist()
    width = max((len(v) for v in top.values()), default=1)
    ranked = np.array([(top.get(x, []) + [""] * width)[:width] for x in q], dtype=object)
    return retrieval_metrics(ranked, qrels["item_id"].to_numpy(dtype=object), n_candidates=n_candidates)
