"""Dual-tower retrieval: exact top-k by inner product of unit vectors (torch, batched)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class TopK(NamedTuple):
    indices: np.ndarray  # (Q, k) row indices into the gallery, best first
    scores: np.ndarray  # (Q, k) cosine similarities


@torch.inference_mode()
def exact_topk(queries: np.ndarray, items: np.ndarray, *, k: int = 10, batch_size: int = 1024,
               device: str = "cpu") -> TopK:
    """Exact top-k of queries (Q, D) against items (N, D) by matrix product; ties keep the lower index."""
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"queries {queries.shape} and items {items.shape} must be 2-D with the same dimension")
    k = min(k, len(items))
    gallery = torch.from_numpy(np.ascontiguousarray(items, dtype=np.float32)).to(device)
    idx_out, score_out = [], []
    for start in range(0, len(queries), batch_size):
        q = torch.from_numpy(np.ascontiguousarray(queries[start:start + batch_size], dtype=np.float32)).to(device)
        s, i = torch.topk(q @ gallery.T, k, dim=1, sorted=True)
        idx_out.append(i.cpu().numpy())
        score_out.append(s.cpu().numpy())
    return TopK(np.concatenate(idx_out), np.concatenate(score_out))
