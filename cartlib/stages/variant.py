"""One row of the grid: identifiers → train → evaluate.

Every row of stage `ablations` (the paper's ablations, the identifier schemes, the fusion controls,
the sweeps) is ``params`` with the grid's schedule (``grid.train``: overrides of ``train`` shared by
every row, its `full` row included) and then the row's own overrides of the ``identifiers``,
``train`` and ``evaluate`` sections. Every row trains with the same rule as the main model (validation
recall@1 after each epoch, early stopping after ``train.patience`` epochs, the best epoch kept) and
is scored on the same test queries (``grid.n_queries``; 0 = all). Identifiers come from the `identifiers` stage when the
override keeps its structure (K, M, codebook size, …), else they are built here on the task's
features with the overridden settings.

Trained models are cached under ``models/<task>/variants/<key>.pt``, named by the settings part of
:func:`cartlib.cache_key.run_key` (the whole train config, seed, identifier table, training texts
and targets): training is deterministic on the CPU, so two rows that differ only in evaluation
(the beam sweep) or that coincide train once. The file also records the fingerprint of the training code; a model trained by other code
is stale: never loaded, retrained (a line says so) and overwritten.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from cartlib import io, metrics as M
from cartlib.cache_key import StaleCacheError, WeightsKey, run_key
from cartlib.captions.io import pseudo_captions_path, with_pseudo_captions
from cartlib.config import Params, TrainConfig, resolve_device, with_overrides
from cartlib.data import schema
from cartlib.data.features import load_features
from cartlib.data.idstore import IdentifierTable, load_identifiers
from cartlib.ids import build_identifier_model
from cartlib.ids.prefix import PrefixIndex
from cartlib.ids.vocab import Vocabulary
from cartlib.model.sizing import trainable_parameters
from cartlib.paths import TaskPaths
from cartlib.ranking import rank_queries
from cartlib.stages.train import (TrainingPairs, build_model, load_bundle, load_qrels_val, save_bundle,
                                  training_pairs, validation_set)
from cartlib.train import ValidationSet, resolve_precision, train_cart

# identifier settings that change the table itself (scheme aside); anything else is training-only
_STRUCTURE = ("n_clusters", "n_levels", "codebook_size", "latent_dim", "hidden_dim", "epochs", "lr", "beta",
              "batch_size", "last_level", "seed")


class VariantResult(NamedTuple):
    metrics: dict
    run: pd.DataFrame
    history: pd.DataFrame
    model_key: str
    cache_hit: bool


def grid_params(params: Params, overrides: dict) -> Params:
    """``params`` on the grid's schedule (``grid.train``), then with a row's ``overrides``."""
    return with_overrides(with_overrides(params, {"train": params.grid.train}, where="params.yaml grid"),
                          overrides, where="overrides")


def query_subset(qrels: pd.DataFrame, n_queries: int, seed: int) -> pd.DataFrame:
    """The qrels rows of the same ``n_queries`` random test queries for every row (all when 0 or
    more than there are); a query keeps all its relevant items."""
    query_ids = qrels["query_id"].drop_duplicates().to_numpy()
    if n_queries <= 0 or n_queries >= len(query_ids):
        return qrels
    picked = query_ids[np.sort(np.random.default_rng(seed).choice(len(query_ids), size=n_queries, replace=False))]
    return qrels[qrels["query_id"].isin(set(picked))].reset_index(drop=True)


def identifier_table(params: Params, paths: TaskPaths, dataset: schema.Dataset, *, progress: bool) -> IdentifierTable:
    """The table of ``params.identifiers.scheme``: from the `identifiers` stage when its structure
    matches the stage's settings (``stage_params``), else built here."""
    stage = load_identifiers(paths.data / "identifiers", params.identifiers.scheme,
                             item_ids=dataset.items["item_id"].to_numpy()) \
        if (paths.data / "identifiers" / f"{params.identifiers.scheme}.npz").exists() else None
    cfg = params.identifiers
    if stage is not None and all(stage.meta.get("config", {}).get(k) == getattr(cfg, k) for k in _STRUCTURE):
        return stage
    feats = load_features(paths.features, dataset)
    if cfg.n_clusters > len(feats.items):
        raise ValueError(f"identifiers.n_clusters={cfg.n_clusters} exceeds the {len(feats.items)} items")
    model = build_identifier_model(cfg.scheme, n_clusters=cfg.n_clusters, n_levels=cfg.n_levels,
                                   codebook_size=cfg.codebook_size, latent_dim=cfg.latent_dim,
                                   hidden_dim=cfg.hidden_dim, epochs=cfg.epochs, lr=cfg.lr, beta=cfg.beta,
                                   batch_size=cfg.batch_size, last_level=cfg.last_level, seed=cfg.seed,
                                   device=resolve_device(params.base.device), progress=progress)
    model.fit(feats.items)
    vocab = Vocabulary(level_sizes=tuple(int(s) for s in model.level_sizes_))
    codes = vocab.check_codes(model.codes_)
    return IdentifierTable(cfg.scheme, codes, np.asarray(feats.item_ids, dtype=str), vocab, vocab.fingerprint(codes),
                           {"config": dataclasses.asdict(cfg), "built_by": "variant"})


class TrainedVariant(NamedTuple):
    tokenizer: object
    model: object  # CartModel, in eval mode on the device
    history: list[dict]
    key: WeightsKey
    cache_hit: bool


def trained_model(cfg: TrainConfig, *, table: IdentifierTable, texts: list[str], rows: np.ndarray, seed: int,
                  cache_dir: Path, device: str = "cpu", progress: bool = True,
                  val: ValidationSet | None = None) -> TrainedVariant:
    """The CART model trained with ``cfg`` on ``texts`` → ``table.codes[rows]``: the cached one when
    ``cache_dir/<settings digest>.pt`` was produced under the same key (settings, data, validation
    set and code), else trained now and cached. With ``val``: validation recall@1 after every epoch,
    the best epoch's weights kept, early stopping after ``cfg.patience`` epochs without improvement."""
    targets = torch.tensor(table.codes[rows])
    key = run_key(cfg, seed=seed, table=table, texts=texts, targets=targets, val=val)
    path = cache_dir / f"{key.config_digest}.pt"
    if path.exists():
        try:
            tokenizer, model, bundle = load_bundle(path, table=table, device=device, expect_key=key)
            return TrainedVariant(tokenizer, model, bundle["history"], key, True)
        except StaleCacheError as e:
            print(f"variant model: {e}; retraining (the file is overwritten)")
    torch.manual_seed(seed)
    tokenizer, model = build_model(cfg, table.vocab.level_sizes)
    result = train_cart(model.to(device), tokenizer=tokenizer, texts=texts, codes=targets, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip,
                        consistency_weight=cfg.consistency_weight, seed=seed, max_length=cfg.max_length,
                        checkpoint_dir=None, progress=progress, key=key, val=val, patience=cfg.patience,
                        precision=resolve_precision(cfg.precision, device), nproc=cfg.nproc)
    save_bundle(path, model=result.model, cfg=cfg, table=table, history=result.history, key=key)
    return TrainedVariant(tokenizer, result.model, result.history, key, False)


def variant_dataset(paths: TaskPaths) -> schema.Dataset:
    """The task's dataset with the `captions` stage's pseudo-captions (what every grid row trains on)."""
    dataset = schema.load_dataset(paths.dataset, verify_hashes=False)
    return with_pseudo_captions(dataset, pseudo_captions_path(paths))  # the captions stage's


class VariantTraining(NamedTuple):
    table: IdentifierTable
    pairs: TrainingPairs
    val: ValidationSet | None
    trained: TrainedVariant


def train_variant(p: Params, paths: TaskPaths, dataset: schema.Dataset, *, progress: bool = True) -> VariantTraining:
    """The training half of :func:`run_variant` for ``p`` (already :func:`grid_params`): training
    pairs, identifier table, the validation set (validation queries only) and the trained (or
    cached, ``paths.models / "variants"``) model. Reads no test query and no test qrels."""
    cfg = p.train
    # before the identifier table: a caption-enhanced row without pseudo-captions stops here
    pairs = training_pairs(dataset, caption_enhancement=cfg.caption_enhancement, seed=p.base.seed,
                           refs_per_item=cfg.refs_per_item, max_train_items=cfg.max_train_items)
    table = identifier_table(p, paths, dataset, progress=progress)
    val = validation_set(dataset, load_qrels_val(paths, dataset), torch.tensor(table.codes), table.vocab.level_sizes)
    trained = trained_model(cfg, table=table, texts=pairs.texts, rows=pairs.rows, seed=cfg.seed,
                            cache_dir=paths.models / "variants", device=resolve_device(p.base.device),
                            progress=progress, val=val)
    return VariantTraining(table, pairs, val, trained)


def run_variant(params: Params, paths: TaskPaths, *, overrides: dict, progress: bool = True) -> VariantResult:
    """Train (or reuse) and evaluate the generative model of ``params`` + ``overrides``."""
    p = grid_params(params, overrides)
    cfg = p.train
    device = resolve_device(p.base.device)
    dataset = variant_dataset(paths)
    qrels = query_subset(schema.load_qrels(paths.qrels, dataset), p.grid.n_queries, p.base.seed)
    table, pairs, _, trained = train_variant(p, paths, dataset, progress=progress)
    tokenizer, model, history, hit = trained.tokenizer, trained.model, trained.history, trained.cache_hit
    key = trained.key.config_digest

    test_rows = np.flatnonzero(dataset.items["split"].to_numpy() == "test")
    gallery_ids = dataset.items["item_id"].to_numpy()[test_rows]
    index = PrefixIndex.build(torch.from_numpy(table.codes[test_rows]), table.vocab.level_sizes).to(device)
    rel = M.group_qrels(qrels)
    texts = dataset.captions.set_index("caption_id").loc[rel.query_ids, "text"].tolist()
    start = time.perf_counter()
    ranked, scores, _, seconds = rank_queries(model, tokenizer, texts, index, gallery_ids, cfg=p.evaluate,
                                              max_length=cfg.max_length, progress=progress)
    metrics = M.retrieval_metrics(ranked, rel.relevant, n_candidates=len(gallery_ids))
    metrics.update({
        "scheme": table.scheme,
        "level_sizes": "×".join(map(str, table.vocab.level_sizes)),
        "beam": min(p.evaluate.beam, len(gallery_ids)),
        "n_train_texts": len(pairs.texts),
        "trainable_params": trainable_parameters(model),
        "train_epochs": len(history),
        **({} if not history or "val_recall_at_1" not in history[0] else {
            "best_epoch": 1 + int(np.argmax([h["val_recall_at_1"] for h in history])),
            "val_recall_at_1": max(h["val_recall_at_1"] for h in history)}),
        "train_seconds": round(float(sum(h["seconds"] for h in history)), 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "queries_per_second": round(len(texts) / seconds, 2),
        "model_key": key,
        "model_cache_hit": hit,
        "overrides": json.dumps(overrides, sort_keys=True),
    })
    run = M.run_table(rel.query_ids, ranked, scores)
    return VariantResult(metrics, run, pd.DataFrame(history), key, hit)


def write_variant(out: Path, result: VariantResult) -> list[Path]:
    """metrics.json and run.tsv of one row (atomic writes)."""
    return [io.write_json(out / "metrics.json", result.metrics), io.write_dataframe_tsv(out / "run.tsv", result.run)]


def row_seeds(params: Params, row: str) -> tuple[int, ...]:
    """The training seeds of ablation row ``row``: every one of ``ablations.seeds`` for the seeded
    rows (the paper's), the first alone for the others."""
    seeds = params.ablations.seeds
    return tuple(seeds) if row in params.ablations.seeded_rows else tuple(seeds[:1])


def seed_overrides(overrides: dict, seed: int) -> dict:
    """``overrides`` with training seed ``seed``; a row that builds its own identifiers (it changes
    their structure) also draws them with that seed."""
    out = {section: dict(values or {}) for section, values in overrides.items()}
    out.setdefault("train", {})["seed"] = seed
    if any(k in _STRUCTURE for k in out.get("identifiers", {})):
        out["identifiers"]["seed"] = seed
    return out


_METRICS = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10")


def mean_over_seeds(results: dict[int, VariantResult]) -> dict:
    """The first seed's metrics with the ranking metrics replaced by their mean over the seeds
    (None stays None: not applicable), plus ``n_seeds``."""
    first = next(iter(results.values())).metrics
    out = dict(first)
    for key in _METRICS:
        values = [r.metrics.get(key) for r in results.values()]
        out[key] = None if any(v is None for v in values) else float(np.mean(values))
    out["n_seeds"] = len(results)
    return out


def _curve(history: pd.DataFrame) -> str | None:
    """Validation R@1 after each epoch, space-separated (where the training levelled off: the report's
    convergence check, cartlib/convergence.py); None without validation."""
    if "val_recall_at_1" not in history:
        return None
    return " ".join(f"{v:.4f}" for v in history["val_recall_at_1"])


def run_ablation(params: Params, root: str | Path, row: str, *, task: str, progress: bool = True) -> VariantResult:
    """Stage `ablations`: one row of ``params.ablations.rows`` on ``task`` (one of
    ``params.ablations.tasks``), trained with each of its seeds (:func:`row_seeds`).

    Writes the row's ``metrics.json`` (the ranking metrics averaged over the seeds, ``n_seeds``) and
    ``run.tsv`` (the first seed's), ``seeds/seed_<s>/run.tsv`` + ``metrics.json`` for every other
    seed, and ``seeds/seeds.tsv`` (every seed's metrics and validation R@1 per epoch). Returns the first seed's result with the
    averaged metrics."""
    from cartlib.paths import task_paths
    from cartlib.results import publish, split_metrics

    if row not in params.ablations.rows:
        raise KeyError(f"{row!r} is not a row of params.yaml ablations.rows ({sorted(params.ablations.rows)})")
    if task not in params.ablations.tasks:
        raise KeyError(f"{task!r} is not one of params.yaml ablations.tasks {list(params.ablations.tasks)}")
    paths = task_paths(root, task)
    overrides = params.ablations.rows[row]
    results = {seed: run_variant(params, paths, overrides=seed_overrides(overrides, seed), progress=progress)
               for seed in row_seeds(params, row)}
    first_seed, first = next(iter(results.items()))
    metrics = mean_over_seeds(results)
    metrics["overrides"] = json.dumps(overrides, sort_keys=True)
    out = paths.results("ablations") / row
    per_seed = pd.DataFrame([{"seed": s, **{k: r.metrics.get(k) for k in ("model_key", *_METRICS)},
                              "train_epochs": r.metrics["train_epochs"], "best_epoch": r.metrics.get("best_epoch"),
                              "val_recall_at_1_per_epoch": _curve(r.history)}
                             for s, r in results.items()])
    io.write_dataframe_tsv(out / "seeds" / "seeds.tsv", per_seed)
    for seed, result in list(results.items())[1:]:
        write_variant(out / "seeds" / f"seed_{seed}",
                      result._replace(metrics=split_metrics(result.metrics).metrics))
    publish(paths, "ablations", params=params, metrics=metrics, run=first.run, variant=row)
    return first._replace(metrics=metrics)
