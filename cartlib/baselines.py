"""Non-generative baselines: exact dual-tower search (torch) and FAISS indexes, with their recall
against exact search. Used by the `features`, `baselines` and `throughput` stages and the tutorial."""
from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch

__all__ = ["TopK", "SCORE_BLOCK_BYTES", "RECALL_TARGET", "exact_topk", "recall_vs_exact", "faiss_indexes",
           "ivf_nlist", "calibrated_faiss_index"]

SCORE_BLOCK_BYTES = 256 * 2**20  # bound on one (queries, gallery chunk) score block of exact search
RECALL_TARGET = 0.95  # calibrated IVF nprobe / HNSW efSearch: the smallest power of two reaching this recall@k


class TopK(NamedTuple):
    indices: np.ndarray | torch.Tensor  # (Q, k) row indices into the gallery, best first
    scores: np.ndarray | torch.Tensor  # (Q, k) inner products (cosine similarities for unit rows)


def exact_topk(queries: np.ndarray | torch.Tensor, items: np.ndarray | torch.Tensor, *, k: int = 10,
               batch_size: int = 1024, block_bytes: int = SCORE_BLOCK_BYTES,
               device: str | torch.device | None = None) -> TopK:
    """Exact inner-product top-``k`` of ``queries (Q, D)`` over ``items (N, D)``, best first.

    NumPy inputs are scored in float32 on ``device`` (default CPU) and give NumPy outputs; tensors
    are scored in their own dtype and device (e.g. fp16 on a GPU, for the throughput benchmark) and
    give tensors. Queries go in batches of ``batch_size``; the gallery in chunks whose
    ``(batch, chunk)`` score block stays within ``block_bytes``, merged by a second top-k.
    """
    as_numpy = not isinstance(queries, torch.Tensor)
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and items {tuple(items.shape)} must be 2-D with the same "
                         f"dimension")
    if as_numpy:
        dev = torch.device(device or "cpu")
        gallery = torch.from_numpy(np.ascontiguousarray(items, dtype=np.float32)).to(dev)
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
    else:
        gallery, q_all = items, queries
    n = gallery.shape[0]
    k = min(k, n)
    idx_out, score_out = [], []
    with torch.inference_mode():
        for start in range(0, q_all.shape[0], batch_size):
            q = q_all[start:start + batch_size]
            chunk = max(4096, block_bytes // max(1, q.shape[0] * gallery.element_size()))
            best_s = best_i = None
            for lo in range(0, n, chunk):
                ts, ti = (q @ gallery[lo:lo + chunk].T).topk(min(k, n - lo), dim=1)  # (B, c) block
                ti = ti + lo
                if best_s is None:
                    best_s, best_i = ts, ti
                else:
                    best_s, pos = torch.cat((best_s, ts), 1).topk(k, dim=1)
                    best_i = torch.cat((best_i, ti), 1).gather(1, pos)
            idx_out.append(best_i)
            score_out.append(best_s)
    idx, scores = torch.cat(idx_out), torch.cat(score_out)
    if as_numpy:
        return TopK(idx.cpu().numpy(), scores.cpu().numpy())
    return TopK(idx, scores)


def recall_vs_exact(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean top-k overlap (order ignored) of ``found (Q, k)`` with the exact ``exact (Q, k)``; 1.0 =
    the exact neighbours. -1 (FAISS: fewer results than k) never counts as a hit."""
    found, exact = np.asarray(found), np.asarray(exact)
    hits = (found[:, :, None] == exact[:, None, :]).any(2) & (found >= 0)
    return float(hits.sum(1).mean() / exact.shape[1])


def faiss_indexes(items: np.ndarray, cfg, seed: int) -> dict[str, object]:
    """Flat, IVF and HNSW inner-product indexes over ``items (N, D)`` (unit vectors) with the fixed
    settings of ``cfg`` (a :class:`~cartlib.config.BaselinesConfig`). The HNSW graph is built on one
    thread, so the same items give the same graph (and the same ranked lists) on every run."""
    import faiss

    d = items.shape[1]
    flat = faiss.IndexFlatIP(d)
    flat.add(items)
    nlist = max(1, min(cfg.ivf_nlist, len(items) // 39))  # FAISS wants ≥ 39 training points per cell
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.train(items)
    ivf.add(items)
    ivf.nprobe = min(cfg.ivf_nprobe, nlist)
    hnsw = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a graph built by several threads depends on their timing; the run files must not
    try:
        hnsw.add(items)
    finally:
        faiss.omp_set_num_threads(threads)
    hnsw.hnsw.efSearch = cfg.hnsw_ef_search
    return {"faiss_flat": flat, "faiss_ivf": ivf, "faiss_hnsw": hnsw}


def ivf_nlist(n: int) -> int:
    """IVF lists for N items: ≈ 4√N, capped so that every list gets FAISS's 39 training points."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def _calibrate(index, knob: Callable[[int], None], ladder: Iterable[int], queries: np.ndarray, exact: np.ndarray,
               k: int) -> tuple[int, float]:
    """The first ``ladder`` value whose recall@k reaches :data:`RECALL_TARGET` (else the last one)."""
    value, rec = 0, 0.0
    for value in ladder:
        knob(value)
        rec = recall_vs_exact(index.search(queries, k)[1], exact)
        if rec >= RECALL_TARGET:
            break
    return value, rec


def calibrated_faiss_index(name: str, feats: np.ndarray, *, seed: int, hnsw_m: int, recall_queries: np.ndarray,
                           exact: np.ndarray, k: int) -> tuple[object, dict, float]:
    """One FAISS index (``faiss_flat``, ``faiss_ivf`` or ``faiss_hnsw``) over ``feats``, its search knob
    (IVF nprobe, HNSW efSearch) the smallest power of two whose recall@k against ``exact`` (the exact
    top-k of ``recall_queries``) reaches :data:`RECALL_TARGET`. Returns it, its settings and its recall."""
    import faiss

    d = feats.shape[1]
    info: dict = {}
    if name == "faiss_flat":
        index = faiss.IndexFlatIP(d)
        index.add(feats)
    elif name == "faiss_ivf":
        nlist = ivf_nlist(len(feats))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.niter = 10  # 1M items: 4,000 lists; FAISS's 25 iterations would take minutes on 2 cores
        train = feats
        if len(feats) > 40 * nlist:  # FAISS wants 39-256 points per list; more only slows training
            train = feats[np.random.default_rng(seed).choice(len(feats), 40 * nlist, replace=False)]
        index.train(train)
        index.add(feats)
        ladder = [p for p in (2 ** i for i in range(20)) if p < nlist] + [nlist]
        nprobe, _ = _calibrate(index, lambda v: setattr(index, "nprobe", v), ladder, recall_queries, exact, k)
        index.nprobe = nprobe
        info = {"ivf_nlist": nlist, "ivf_nprobe": nprobe}
    elif name == "faiss_hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.add(feats)
        ladder = [max(k, 16) * 2 ** i for i in range(7)]
        ef, _ = _calibrate(index, lambda v: setattr(index.hnsw, "efSearch", v), ladder, recall_queries, exact, k)
        index.hnsw.efSearch = ef
        info = {"hnsw_m": hnsw_m, "hnsw_ef_search": ef}
    else:
        raise ValueError(f"unknown FAISS system {name!r}")
    return index, info, recall_vs_exact(index.search(recall_queries, k)[1], exact)
