"""Stage `evaluate`: constrained beam search over the test queries against the test items only,
scored with the complete qrels (every relevant item of a query counts)."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from cartlib import io, metrics as M
from cartlib.config import EvaluateConfig, Params, check_task, resolve_device
from cartlib.data import schema
from cartlib.data.idstore import load_identifiers
from cartlib.decode import Precision, constrained_beam_search, default_precision
from cartlib.ids.prefix import PrefixIndex
from cartlib.paths import TaskPaths
from cartlib.results import publish
from cartlib.stages.train import load_bundle


class Ranking(NamedTuple):
    """Top-k of each query from constrained beam search."""

    items: np.ndarray  # (Q, k) int64 gallery row of the prefix index; -1 where fewer than k
    scores: np.ndarray  # (Q, k) float32 sum of log-probabilities; -inf where items == -1
    codes: np.ndarray  # (Q, k, L) int64 generated identifiers; -1 where items == -1
    seconds: float  # wall-clock of encoding + decoding


class EvaluateStageResult(NamedTuple):
    metrics: dict
    run: pd.DataFrame
    errors: pd.DataFrame  # misses by the identifier level of the first wrong token
    comparison: pd.DataFrame  # CART vs the dual-tower baseline
    mlflow_run_id: str | None


@torch.inference_mode()
def decode_texts(model, tokenizer, texts: list[str], index: PrefixIndex, *, beam: int, top_k: int, batch_size: int,
                 max_length: int, progress: bool = False, precision: Precision | str | None = None) -> Ranking:
    """Encode query texts in length-sorted batches and decode the top-k identifiers of each
    (:func:`cartlib.decode.constrained_beam_search`, CART inference); items are gallery rows.
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
    order = np.argsort([len(t) for t in texts], kind="stable")
    q, depth = len(texts), len(index.level_sizes)
    items = np.full((q, top_k), -1, np.int64)
    scores = np.full((q, top_k), -np.inf, np.float32)
    codes = np.full((q, top_k, depth), -1, np.int64)
    precision = default_precision(model.device) if precision is None else precision
    start = time.perf_counter()
    for lo in tqdm(range(0, q, batch_size), desc="beam search", disable=not progress, unit="batch"):
        idx = order[lo:lo + batch_size]
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


def first_wrong_level(generated: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """(Q, L) top-1 codes vs (Q, L) gold codes → level of the first differing token (-1 = none)."""
    diff = generated != gold
    return np.where(diff.any(1), diff.argmax(1), -1)


def run(params: Params, paths: TaskPaths, *, progress: bool = True, scheme: str | None = None,
        model_name: str = "cart.pt", cfg: EvaluateConfig | None = None, variant: str | None = None) -> EvaluateStageResult:
    check_task(paths.task, params)
    cfg = cfg or params.evaluate
    device = resolve_device(params.base.device)
    dataset = schema.load_dataset(paths.dataset, verify_hashes=False)
    qrels = schema.load_qrels(paths.qrels, dataset)
    table = load_identifiers(paths.data / "identifiers", scheme or params.identifiers.scheme,
                             item_ids=dataset.items["item_id"].to_numpy())
    tokenizer, model, bundle = load_bundle(paths.models / model_name, table=table, device=device)
    test_rows = np.flatnonzero(dataset.items["split"].to_numpy() == "test")
    gallery_ids = dataset.items["item_id"].to_numpy()[test_rows]
    gallery_codes = torch.from_numpy(table.codes[test_rows])
    index = PrefixIndex.build(gallery_codes, table.vocab.level_sizes).to(device)
    rel = M.group_qrels(qrels)
    queries = dataset.captions.set_index("caption_id").loc[rel.query_ids]
    texts = queries["text"].tolist()
    ranked, scores, codes, seconds = rank_queries(model, tokenizer, texts, index, gallery_ids, cfg=cfg,
                                                  max_length=bundle["train_config"]["max_length"], progress=progress)
    result = M.retrieval_metrics(ranked, rel.relevant, n_candidates=len(gallery_ids))
    result["queries_per_second"] = round(len(texts) / seconds, 2)
    run_frame = M.run_table(rel.query_ids, ranked, scores)

    # error analysis: for misses at rank 1 (no relevant item), the level of the first token that
    # differs from the identifier of the query's own item (the one the caption was written for)
    row_in_gallery = pd.Series(np.arange(len(gallery_ids)), index=gallery_ids)
    gold_codes = table.codes[test_rows][row_in_gallery[queries["item_id"]].to_numpy()]
    level = first_wrong_level(codes[:, 0], gold_codes)
    miss = ~np.array([r in relevant for r, relevant in zip(ranked[:, 0].tolist(), rel.relevant)], dtype=bool)
    names = [f"level {l}" + (" (k, coarse)" if l == 0 else " (u, unique)" if l == table.codes.shape[1] - 1 else "")
             for l in range(table.codes.shape[1])]
    counts = np.bincount(level[miss & (level >= 0)], minlength=table.codes.shape[1])
    errors = pd.DataFrame({"first_wrong_level": names, "misses": counts,
                           "share_of_misses": counts / max(int(miss.sum()), 1)})
    for l, c in enumerate(counts):
        result[f"miss_share_level_{l}"] = float(c / max(int(miss.sum()), 1))

    comparison = _comparison(paths, result)
    run_id = publish(paths, "evaluate", params=params, metrics=result, run=run_frame,
                     tables={"errors": errors, "comparison": comparison}, variant=variant)
    return EvaluateStageResult(result, run_frame, errors, comparison, run_id)


def _comparison(paths: TaskPaths, cart: dict) -> pd.DataFrame:
    keys = ["recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10"]
    rows = [{"system": "CART (generative)", **{k: cart[k] for k in keys}}]
    baseline = paths.results("features") / "metrics.json"
    if baseline.exists():
        dual = io.read_json(baseline)
        rows.append({"system": "dual-tower (features stage)", **{k: dual.get(k) for k in keys}})
    return pd.DataFrame(rows)
