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

Every system's ranked lists go to ``results/baselines/<task>/runs/<system>.tsv.gz`` (gzip) (the run.tsv
format: ``query_id rank item_id score``, the top 10 per test query, scores rounded by
:func:`cartlib.metrics.run_table`), so the report can pair any system with CART over the queries.
Items a system does not rank (FAISS's -1, an item without pseudo-captions) are not listed.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple, TypeVar

import numpy as np
import pandas as pd

from cartlib import io, metrics as M
from cartlib.baselines import exact_topk, faiss_indexes, recall_vs_exact
from cartlib.captions.io import pseudo_captions_path, with_pseudo_captions
from cartlib.config import Params, check_task
from cartlib.data import schema
from cartlib.data.features import load_features
from cartlib.paths import TaskPaths
from cartlib.results import publish

K = 10
T = TypeVar("T")


class BaselinesResult(NamedTuple):
    table: pd.DataFrame  # one row per system
    metrics: dict  # flat: <system>_<metric>
    runs: dict[str, pd.DataFrame]  # system -> its run table (runs/<system>.tsv.gz)
    mlflow_run_id: str | None


def _timed(fn: Callable[[], T], repeats: int) -> tuple[T, float]:
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


def top_k_of(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, k)`` columns of the ``k`` best ``scores (Q, N)`` and their scores, best first; ties
    by column order (a stable sort), so the ranking is the same on every run."""
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(scores, idx, axis=1)


def ranked_run(query_ids: np.ndarray, gallery_ids: np.ndarray, indices: np.ndarray,
               scores: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """Gallery ids ``(Q, k)`` ("" for a slot a system left empty: index -1 or score -inf) and the run table."""
    indices, scores = np.asarray(indices), np.asarray(scores, dtype=np.float64)
    empty = (indices < 0) | ~np.isfinite(scores)
    ids = np.where(empty, "", gallery_ids.astype(object)[np.where(empty, 0, indices)])
    return ids, M.run_table(query_ids, ids, np.where(empty, np.nan, scores))


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

    rows, ranked_of = [], {}  # ranked_of: system -> (indices (Q, k), scores (Q, k))
    (exact, exact_scores), secs = _timed(lambda: tuple(exact_topk(queries, items, k=k)), cfg.repeats)
    ranked_of["dual_tower_exact"] = exact, exact_scores
    rows.append(("dual_tower_exact", "dual-tower, exact (torch matmul)", secs, 1.0))
    for name, index in faiss_indexes(items, cfg, params.base.seed).items():
        (found_scores, found), secs = _timed(lambda index=index: index.search(queries, k), cfg.repeats)
        ranked_of[name] = found, found_scores
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

        def pseudo_only() -> tuple[np.ndarray, np.ndarray]:
            return top_k_of(pseudo_caption_scores(mini_q, pvec, owner, n), k)

        def fused() -> tuple[np.ndarray, np.ndarray]:
            return top_k_of(w * (queries @ items.T) + (1 - w) * pseudo_caption_scores(mini_q, pvec, owner, n), k)

        for name, label, fn in (("pseudo_caption", "pseudo-caption matching (MiniLM, no training)", pseudo_only),
                                ("pseudo_caption_fused", f"dual-tower + pseudo-caption (w = {w})", fused)):
            ranked_of[name], secs = _timed(fn, cfg.repeats)
            rows.append((name, label, secs, float("nan")))

    records, flat, runs = [], {}, {}
    for name, label, secs, rve in rows:
        ranked, runs[name] = ranked_run(rel.query_ids, gallery_ids, *ranked_of[name])
        m = M.retrieval_metrics(ranked, gold, n_candidates=n)
        rec = {"system": name, "description": label, **{key: m[key] for key in
               ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10")},
               "queries_per_second": round(len(queries) / secs, 1), "recall_vs_exact": rve,
               "n_queries": m["n_queries"], "n_candidates": n}
        records.append(rec)
        for key in ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "queries_per_second", "recall_vs_exact"):
            if rec[key] is not None and not (isinstance(rec[key], float) and np.isnan(rec[key])):
                flat[f"{name}_{key}"] = rec[key]
    table = pd.DataFrame(records)
    flat.update({"n_queries": len(queries), "n_candidates": n})
    run_id = publish(paths, "baselines", params=params, metrics=flat, tables={"systems": table})
    for name, frame in runs.items():  # gzip: six systems × three tasks of 5,000 queries stay a few MB in git
        io.write_dataframe_tsv(paths.results("baselines") / "runs" / f"{name}.tsv.gz", frame)
    return BaselinesResult(table, flat, runs, run_id)
