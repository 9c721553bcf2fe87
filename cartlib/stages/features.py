"""Stage `features`: frozen MiniLM text vectors, a media tower trained into that space (on the
train split's items and reference captions only: no test or val caption is ever a training input),
and the dual-tower baseline (test queries against the test items only, complete qrels)."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from cartlib import baselines, io, metrics as M, viz
from cartlib.config import Params, check_task, resolve_device
from cartlib.data import schema
from cartlib.data.features import Features, save_features
from cartlib.encoders import contrastive, media as media_towers, text as text_enc
from cartlib.paths import TaskPaths
from cartlib.results import publish


class FeaturesStageResult(NamedTuple):
    features: Features
    history: pd.DataFrame  # per-epoch training curve
    metrics: dict  # dual-tower baseline metrics (+ timings)
    run: pd.DataFrame  # run.tsv rows
    figure: object  # training curve
    mlflow_run_id: str | None


def run(params: Params, paths: TaskPaths, *, progress: bool = True) -> FeaturesStageResult:
    check_task(paths.task, params)
    cfg = params.features
    device = resolve_device(params.base.device)
    dataset = schema.load_dataset(paths.dataset)  # validates before the expensive part
    qrels = schema.load_qrels(paths.qrels, dataset)
    if cfg.encoder == "towers":
        if dataset.media is None:
            raise schema.DataFormatError(f"{paths.dataset}: no media.npy; the built-in media towers need rendered "
                                         f"media (for a real dataset set features.encoder to clip, clap or precomputed)")
        item_vecs, cap_ids, cap_vecs, history, meta, timings = _tower_features(params, paths, dataset, device, progress)
    else:
        item_vecs, cap_ids, cap_vecs, history, meta, timings = _pretrained_features(params, paths, dataset, device, progress)
    save_features(paths.features, items=item_vecs, caption_ids=cap_ids, captions=cap_vecs, meta=meta)
    row_of_caption = pd.Series(np.arange(len(cap_ids)), index=cap_ids)

    # dual-tower baseline: test queries against the test items only
    test_items = dataset.split_items("test")
    test_rows = test_items.index.to_numpy()
    rel = M.group_qrels(qrels)
    q_rows = row_of_caption[rel.query_ids].to_numpy()
    top = baselines.exact_topk(cap_vecs[q_rows], item_vecs[test_rows], k=10, device=device)
    ranked_ids = test_items["item_id"].to_numpy()[top.indices]
    result = M.retrieval_metrics(ranked_ids, rel.relevant, n_candidates=len(test_items))
    run_frame = M.run_table(rel.query_ids, ranked_ids, top.scores)
    result.update({k: round(v, 2) for k, v in timings.items()})
    features = Features(dataset.items["item_id"].to_numpy(), item_vecs, cap_ids, cap_vecs, meta)
    curve = viz.training_curve(history, title=f"{paths.task}: media tower InfoNCE loss (train split)")
    run_id = publish(paths, "features", params=params, metrics=result, run=run_frame,
                     tables={"history": history}, figures={"training_curve": curve})
    return FeaturesStageResult(features, history, result, run_frame, curve, run_id)


def _tower_features(params: Params, paths: TaskPaths, dataset: schema.Dataset, device: str, progress: bool):
    """Built-in benchmark: frozen MiniLM caption vectors + a media tower trained into that space."""
    cfg, seed = params.features, params.base.seed
    torch.manual_seed(seed)
    timings = {}
    # 1. frozen text vectors for every reference caption
    t0 = time.perf_counter()
    tokenizer, text_model = text_enc.load_text_encoder()
    refs = dataset.captions[dataset.captions["kind"] == "reference"]
    cap_vecs = text_enc.encode_sentences(refs["text"].tolist(), tokenizer=tokenizer, model=text_model,
                                         batch_size=cfg.text_batch_size, device=device, progress=progress)
    timings["text_seconds"] = time.perf_counter() - t0

    # 2. train the media tower on the train split: (N_train, C, D) caption vectors per item
    t0 = time.perf_counter()
    pairs = tower_training_inputs(dataset)
    text_train = np.stack([cap_vecs[rows] for rows in pairs.caption_rows])
    media_train = np.asarray(dataset.media[pairs.media_rows])
    tower = media_towers.build_tower(paths.task, out_dim=cap_vecs.shape[1], width=cfg.width,
                                     n_mels=cfg.n_mels, media_shape=tuple(dataset.media.shape[1:]))
    trained = contrastive.train_tower(tower, media=media_train, text=text_train, epochs=cfg.epochs,
                                      batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      temperature=cfg.temperature, seed=seed, device=device, progress=progress)
    io.torch_save({"task": paths.task, "state_dict": trained.model.state_dict(), "history": trained.history,
                   "config": cfg.__dict__}, paths.models / "encoder.pt")
    timings["train_seconds"] = time.perf_counter() - t0

    # 3. item features for the whole gallery (test + train)
    t0 = time.perf_counter()
    item_vecs = contrastive.embed_media(trained.model, dataset.media, device=device, progress=progress)
    item_vecs = item_vecs[dataset.items["media_index"].to_numpy()]  # media rows → items.tsv rows
    timings["embed_seconds"] = time.perf_counter() - t0
    meta = {"text_model": "all-MiniLM-L6-v2 (frozen, mean-pooled)", "media_encoder": type(trained.model).__name__,
            "dataset_sha256": dataset.manifest["sha256"]}
    return item_vecs, refs["caption_id"].to_numpy(), cap_vecs, pd.DataFrame(trained.history), meta, timings


class TowerInputs(NamedTuple):
    """What the media tower trains on: train items only (never a test or val reference caption)."""
    item_ids: np.ndarray  # (N_train,) the train items
    media_rows: np.ndarray  # (N_train,) their rows of media.npy
    caption_ids: np.ndarray  # (N_train, C) the first C reference captions of each
    caption_rows: np.ndarray  # (N_train, C) their rows among the dataset's reference captions


def tower_training_inputs(dataset: schema.Dataset) -> TowerInputs:
    """The (media, captions) pairs of the media tower's InfoNCE: every train item with its first C
    reference captions (C = the fewest any train item has)."""
    refs = dataset.captions[dataset.captions["kind"] == "reference"]
    train_items = dataset.split_items("train")
    if train_items.empty:
        raise schema.DataFormatError(f"{dataset.folder}: no train items to train the media tower on")
    row_of_caption = pd.Series(np.arange(len(refs)), index=refs["caption_id"].to_numpy())
    per_item = refs.groupby("item_id", sort=False)["caption_id"].apply(list)
    ids = train_items["item_id"].to_numpy()
    n_caps = min(len(per_item.get(i, [])) for i in ids)
    if n_caps == 0:
        raise schema.DataFormatError(f"{dataset.folder}: a train item has no reference caption")
    cap_ids = np.array([per_item[i][:n_caps] for i in ids], dtype=object)
    return TowerInputs(ids, train_items["media_index"].to_numpy(), cap_ids,
                       row_of_caption[cap_ids.reshape(-1)].to_numpy().reshape(cap_ids.shape))


def _pretrained_features(params: Params, paths: TaskPaths, dataset: schema.Dataset, device: str, progress: bool):
    """Real datasets: CLIP/CLAP from local weights, or features the user brings (e.g. ImageBind)."""
    cfg = params.features
    t0 = time.perf_counter()
    if cfg.encoder == "precomputed":
        from cartlib.data import real

        tmp = paths.features.with_name(".imported")
        real.import_features(source=cfg.model_path, dataset_folder=paths.dataset, features_folder=tmp)
        from cartlib.data.features import load_features

        f = load_features(tmp, dataset)
        item_vecs, cap_ids, cap_vecs, meta = f.items, f.caption_ids, f.captions, f.meta
    else:
        from cartlib.encoders import pretrained

        ex = pretrained.extract_features(dataset=dataset, root=params.data.root, kind=cfg.encoder,
                                         model_path=cfg.model_path, device=device,
                                         cache_dir=paths.models / "feature_cache", progress=progress)
        item_vecs, cap_ids, cap_vecs, meta = ex.items, ex.caption_ids, ex.captions, ex.meta
    # no training here: the "curve" is a single point so the report keeps its shape
    history = pd.DataFrame([{"epoch": 0, "loss": float("nan"), "temperature": float("nan"), "seconds": 0.0}])
    io.torch_save({"task": paths.task, "encoder": cfg.encoder, "model_path": cfg.model_path}, paths.models / "encoder.pt")
    return item_vecs, cap_ids, cap_vecs, history, meta, {"extract_seconds": time.perf_counter() - t0}
