"""Stage `baselines`: the non-generative rows of the main table, on the same test queries, ranked
against the test items only and scored with the complete qrels.

- **Dual-tower, exact** (torch matrix product) and **FAISS** ``IndexFlatIP`` (exact), ``IndexIVFFlat``
  and ``IndexHNSWFlat`` (approximate) on the `features` stage's vectors: recall against the qrels,
  recall against exact search, and their own queries/s (median of repeats, one batch of all
  queries, this machine).
- **Pseudo-caption matching**, the honest counterpart of caption enhancement: CART is trained on
  every gallery item's pseudo-captions, so a retriever without generation may use them too. Each
  test query is matched against each item's pseudo-captions with the bundled MiniLM (mean-pooled,
  no training; the item's score is its best pseudo-caption's cosine), alone and fused with the
  dual-tower score: ``w · s_dual + (1 − w) · s_pseudo``.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

from cartlib import metrics as M
from cartlib.baselines import exact_topk, faiss_indexes, recall_vs_exact
from cartlib.captions.io import pseudo_captions_path, with_pseudo_captions
from cartlib.config import Params, check_task
from cartlib.data import schema
from cartlib.data.features import load_features
from cartlib.paths import TaskPaths
from cartlib.results import publish

K = 10


class BaselinesResult(NamedTuple):
    table: pd.DataFrame  # one row per system
    metrics: dict  # flat: <system>_<metric>
    mlflow_run_id: str | None


def _timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float]:
    """Result of ``fn`` and the median seconds of ``repeats`` calls after one warm-up."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def pseudo_caption_scores(queries: np.ndarray, pseudo: np.ndarray, owner: np.ndarray, n_items: int) -> np.ndarray:
    """``(Q, N)``: for each item, the best cosine between the query and one of its pseudo-captions
    (``owner[j]`` = gallery row of pseudo-caption ``j``); -inf for items without any."""
    order = np.argsort(owner, kind="stable")
    owners, starts = np.unique(owner[order], return_index=True)
    sims = (queries @ pseudo[order].T).astype(np.float32)  # (Q, P), grouped by item
    out = np.full((len(queries), n_items), -np.inf, dtype=np.float32)
    out[:, owners] = np.maximum.reduceat(sims, starts, axis=1)  # per item, the max over its pseudo-captions
    return out


def run(params: Params, paths: TaskPaths, *, progress: bool = True) -> BaselinesResult:
    check_task(paths.task, params)
    cfg = params.baselines
    dataset = schema.load_dataset(paths.dataset, verify_hashes=False)
    dataset = with_pseudo_captions(dataset, pseudo_captions_path(paths))  # the captions stage's
    qrels = schema.load_qrels(paths.qrels, dataset)
    feats = load_features(paths.features, dataset)
    test_rows = np.flatnonzero(dataset.items["split"].to_numpy() == "test")
    gallery_ids = feats.item_ids[test_rows]
    items = np.ascontiguousarray(feats.items[test_rows], dtype=np.float32)
    cap_row = pd.Series(np.arange(len(feats.caption_ids)), index=feats.caption_ids)
    rel = M.group_qrels(qrels)
    missing = set(rel.query_ids) - set(cap_row.index)
    if missing:
        raise ValueError(f"{paths.features}: no feature for query {sorted(missing)[0]!r} (rerun the features stage)")
    queries = np.ascontiguousarray(feats.captions[cap_row[rel.query_ids].to_numpy()], dtype=np.float32)
    gold = rel.relevant
    n, k = len(items), min(K, len(items))

    rows, ranked_of = [], {}
    exact, secs = _timed(lambda: exact_topk(queries, items, k=k).indices, cfg.repeats)
    ranked_of["dual_tower_exact"] = exact
    rows.append(("dual_tower_exact", "dual-tower, exact (torch matmul)", secs, 1.0))
    for name, index in faiss_indexes(items, cfg, params.base.seed).items():
        found, secs = _timed(lambda index=index: index.search(queries, k)[1], cfg.repeats)
        ranked_of[name] = found
        label = ("FAISS IndexFlatIP (exact)" if name == "faiss_flat" else
                 f"FAISS IVF (nlist {index.nlist}, nprobe {index.nprobe})" if name == "faiss_ivf" else
                 f"FAISS HNSW (M {cfg.hnsw_m}, efSearch {cfg.hnsw_ef_search})")
        rows.append((name, label, secs, recall_vs_exact(found, exact)))

    # pseudo-caption matching with the bundled MiniLM (the features stage encodes reference captions only)
    caps = dataset.captions
    pseudo = caps[(caps["kind"] == "pseudo") & caps["item_id"].isin(set(gallery_ids))]
    if len(pseudo):
        from cartlib.encoders.text import encode_sentences, load_text_encoder

        tokenizer, model = load_text_encoder()
        pvec = encode_sentences(pseudo["text"].tolist(), tokenizer=tokenizer, model=model, progress=progress,
                                desc="encode pseudo-captions")
        if str(feats.meta.get("text_model", "")).startswith("all-MiniLM-L6-v2"):
            mini_q = queries  # the query features already are the bundled MiniLM's
        else:
            texts = caps.set_index("caption_id").loc[rel.query_ids, "text"].tolist()
            mini_q = encode_sentences(texts, tokenizer=tokenizer, model=model, progress=progress,
                                      desc="encode queries (MiniLM)")
        row_in_gallery = pd.Series(np.arange(n), index=gallery_ids)
        owner = row_in_gallery[pseudo["item_id"]].to_numpy()
        w = cfg.fusion_weight

        def pseudo_only() -> np.ndarray:
            return np.argsort(-pseudo_caption_scores(mini_q, pvec, owner, n), axis=1, kind="stable")[:, :k]

        def fused() -> np.ndarray:
            s = w * (queries @ items.T) + (1 - w) * pseudo_caption_scores(mini_q, pvec, owner, n)
            return np.argsort(-s, axis=1, kind="stable")[:, :k]

        for name, label, fn in (("pseudo_caption", "pseudo-caption matching (MiniLM, no training)", pseudo_only),
                                ("pseudo_caption_fused", f"dual-tower + pseudo-caption (w = {w})", fused)):
            found, secs = _timed(fn, cfg.repeats)
            ranked_of[name] = found
            rows.append((name, label, secs, float("nan")))

    records, flat = [], {}
    for name, label, secs, rve in rows:
        ranked = gallery_ids[ranked_of[name]]
        m = M.retrieval_metrics(ranked, gold, n_candidates=n)
        rec = {"system": name, "description": label, **{key: m[key] for key in
               ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10")},
               "queries_per_second": round(len(queries) / secs, 1), "recall_vs_exact": rve,
               "n_queries": m["n_queries"], "n_candidates": n}
        records.append(rec)
        for key in ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "queries_per_second", "recall_vs_exact"):
            if not (isinstance(rec[key], float) and np.isnan(rec[key])):
                flat[f"{name}_{key}"] = rec[key]
    table = pd.DataFrame(records)
    flat.update({"n_queries": len(queries), "n_candidates": n})
    run_id = publish(paths, "baselines", params=params, metrics=flat, tables={"systems": table})
    return BaselinesResult(table, flat, run_id)
