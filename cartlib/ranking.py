"""Rank query texts by generating identifiers: the CART inference the `evaluate` stage and every grid
row run, in the batches the main table's queries/s are timed on (:mod:`cartlib.bench.main_speed`).

A module of its own so that what imports it (the grid's rows, the tutorial) does not depend on the
evaluate stage's speed measurement and its baselines.
"""
from __future__ import annotations

import time
from typing import NamedTuple, Sequence

import numpy as np
import torch

from cartlib.config import EvaluateConfig
from cartlib.decode import Precision, constrained_beam_search, default_precision
from cartlib.ids.prefix import PrefixIndex


class Ranking(NamedTuple):
    """Top-k of each query from constrained beam search."""

    items: np.ndarray  # (Q, k) int64 gallery row of the prefix index; -1 where fewer than k
    scores: np.ndarray  # (Q, k) float32 sum of log-probabilities; -inf where items == -1
    codes: np.ndarray  # (Q, k, L) int64 generated identifiers; -1 where items == -1
    seconds: float  # wall-clock of encoding + decoding


def check_positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def query_batches(texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Query positions of each batch: ``texts`` sorted by length (stable; batches pad little) and cut
    into batches of ``batch_size`` (the last one shorter). The evaluate stage ranks these batches."""
    batch_size = check_positive(batch_size, "evaluate.batch_size (queries per batch)")
    order = np.argsort([len(t) for t in texts], kind="stable")
    return [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]


@torch.inference_mode()
def decode_texts(model, tokenizer, texts: list[str], index: PrefixIndex, *, beam: int, top_k: int, batch_size: int,
                 max_length: int, progress: bool = False, precision: Precision | str | None = None) -> Ranking:
    """Encode query texts in length-sorted batches (:func:`query_batches`,
    the batches every system of the main table's queries/s is timed on) and decode the top-k
    identifiers of each (:func:`cartlib.decode.constrained_beam_search`, CART inference); items are
    gallery rows.
    ``precision``: the decoder's compute dtype; None = :func:`cartlib.decode.default_precision` of the
    model's device (fp16 on CUDA, fp32 on a CPU; beam scores are float32 either way)."""
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("no queries to rank")
    empty = [i for i, t in enumerate(texts) if not str(t).strip()]
    if empty:
        raise ValueError(f"empty query at position {empty[0]}")
    if top_k > index.n_items:
        raise ValueError(f"top_k={top_k} exceeds the {index.n_items} items of the gallery")
    beam = min(beam, index.n_items)
    q, depth = len(texts), len(index.level_sizes)
    items = np.full((q, top_k), -1, np.int64)
    scores = np.full((q, top_k), -np.inf, np.float32)
    codes = np.full((q, top_k, depth), -1, np.int64)
    precision = default_precision(model.device) if precision is None else precision
    start = time.perf_counter()
    for idx in tqdm(query_batches(texts, batch_size), desc="beam search", disable=not progress,
                    unit="batch"):
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(model.device)
        enc = model.encode(batch["input_ids"], batch["attention_mask"])
        out = constrained_beam_search(model, enc, index, beam=beam, top_k=top_k, precision=precision)
        items[idx], scores[idx], codes[idx] = out.items.cpu().numpy(), out.scores.cpu().numpy(), out.codes.cpu().numpy()
    return Ranking(items, scores, codes, time.perf_counter() - start)


def rank_queries(model, tokenizer, texts: list[str], index: PrefixIndex, gallery_ids: np.ndarray, *,
                 cfg: EvaluateConfig, max_length: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """:func:`decode_texts` with ``cfg``'s beam, top-k and batch size; gallery rows mapped to
    ``gallery_ids`` ("" where fewer than k). Returns (ranked ids, scores, codes, seconds)."""
    if cfg.top_k > index.n_items:
        raise ValueError(f"evaluate.top_k={cfg.top_k} exceeds the {index.n_items} items of the gallery")
    r = decode_texts(model, tokenizer, texts, index, beam=cfg.beam, top_k=cfg.top_k, batch_size=cfg.batch_size,
                     max_length=max_length, progress=progress)
    ranked = np.where(r.items >= 0, gallery_ids[np.maximum(r.items, 0)], "")
    return ranked, r.scores, r.codes, r.seconds
