"""Stage `evaluate`: constrained beam search over the test queries against the test items only,
scored with the complete qrels (every relevant item of a query counts); and the main table's
queries/s of every system (CART, dual tower, FAISS, pseudo-caption fusion) on the same batches, with
and without query encoding (:mod:`cartlib.bench.main_speed`), as ``speed.tsv`` (+ ``speed.timings.tsv``)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from cartlib import io, metrics as M
from cartlib.bench import main_speed
from cartlib.captions.io import pseudo_captions_path, with_pseudo_captions
from cartlib.config import EvaluateConfig, Params, check_task, resolve_device
from cartlib.data import schema
from cartlib.data.features import load_features
from cartlib.data.idstore import load_identifiers
from cartlib.decode import default_precision
from cartlib.ids.prefix import PrefixIndex
from cartlib.paths import TaskPaths
from cartlib.results import publish
from cartlib.ranking import Ranking, decode_texts, rank_queries  # noqa: F401  (the stage's API)
from cartlib.stages.train import load_bundle


class EvaluateStageResult(NamedTuple):
    metrics: dict
    run: pd.DataFrame
    errors: pd.DataFrame  # misses by the identifier level of the first wrong token
    comparison: pd.DataFrame  # CART vs the dual-tower baseline
    mlflow_run_id: str | None
    speed: pd.DataFrame | None = None  # queries/s of every main-table system (main_speed.LABELS + RATES)


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
    speed = _speed(params, paths, dataset, cfg=cfg, model=model, tokenizer=tokenizer, index=index,
                   test_rows=test_rows, query_ids=rel.query_ids, texts=texts,
                   max_length=bundle["train_config"]["max_length"], device=device, progress=progress)
    run_id = publish(paths, "evaluate", params=params, metrics=result, run=run_frame,
                     tables={"errors": errors, "comparison": comparison, "speed": speed.table}, variant=variant)
    return EvaluateStageResult(result, run_frame, errors, comparison, run_id, speed.table)


def _speed(params: Params, paths: TaskPaths, dataset: schema.Dataset, *, cfg: EvaluateConfig, model, tokenizer,
           index: PrefixIndex, test_rows: np.ndarray, query_ids, texts: list[str], max_length: int, device: str,
           progress: bool) -> main_speed.SpeedResult:
    """Queries/s of every main-table system on the ranking run's batches, with and without query
    encoding (:func:`cartlib.bench.main_speed.main_table_speed`): CART with the ranking run's decoder,
    the dual-tower systems on the `features` stage's vectors, built as the `baselines` stage builds them."""
    from cartlib.encoders.text import load_text_encoder

    feats = load_features(paths.features, dataset)
    row_of = pd.Series(np.arange(len(feats.caption_ids)), index=feats.caption_ids)
    missing = sorted(set(query_ids) - set(row_of.index))
    if missing:
        raise ValueError(f"{paths.features}: no feature for query {missing[0]!r} (rerun the features stage)")
    gallery_ids = feats.item_ids[test_rows]
    caps = with_pseudo_captions(dataset, pseudo_captions_path(paths)).captions  # the captions stage's
    pseudo = caps[(caps["kind"] == "pseudo") & caps["item_id"].isin(set(gallery_ids))]
    owner = pd.Series(np.arange(len(gallery_ids)), index=gallery_ids)[pseudo["item_id"]].to_numpy()
    from_minilm = str(feats.meta.get("text_model", "")).startswith("all-MiniLM-L6-v2")  # as the baselines stage
    return main_speed.main_table_speed(
        texts=texts, model=model, tokenizer=tokenizer, index=index, evaluate=cfg, max_length=max_length,
        items=feats.items[test_rows], query_vectors=feats.captions[row_of[list(query_ids)].to_numpy()],
        baselines=params.baselines, seed=params.base.seed, device=device,
        text_encoder=load_text_encoder() if from_minilm or len(pseudo) else None, features_from_minilm=from_minilm,
        features_text_model=str(feats.meta.get("text_model", "")), pseudo_texts=pseudo["text"].tolist(),
        pseudo_owner=owner,
        precision=default_precision(model.device), progress=progress)  # decode_texts' precision: the same decoder


def _comparison(paths: TaskPaths, cart: dict) -> pd.DataFrame:
    keys = ["recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10"]
    rows = [{"system": "CART (generative)", **{k: cart[k] for k in keys}}]
    baseline = paths.results("features") / "metrics.json"
    if baseline.exists():
        dual = io.read_json(baseline)
        rows.append({"system": "dual-tower (features stage)", **{k: dual.get(k) for k in keys}})
    return pd.DataFrame(rows)
