"""Stage `train`: the CART model (frozen or fine-tuned MiniLM + compact fused decoder), trained on
train-split queries and, with caption enhancement, on every corpus item's pseudo-captions (train,
val and test items). Validation recall@1 after every epoch: the val items' reference captions
(never trained on) ranked against the val items alone, with the complete `qrels_val.tsv`.

An interrupted run resumes from ``models/<task>/<name>_checkpoints/last.pt`` only when that
checkpoint was written under the same :func:`cartlib.cache_key.run_key` (the whole train config,
seed, identifier table, data, validation set and training code); otherwise it trains from scratch."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from cartlib import io, metrics as M, viz
from cartlib.cache_key import WeightsKey, run_key
from cartlib.captions.io import pseudo_captions_path, with_pseudo_captions
from cartlib.config import ConfigError, Params, TrainConfig, check_task, resolve_device
from cartlib.data import schema
from cartlib.data.idstore import IdentifierTable, load_identifiers
from cartlib.encoders.text import load_text_encoder
from cartlib.ids.prefix import PrefixIndex
from cartlib.model.cart import CartModel
from cartlib.model.fusion import FusionMode
from cartlib.model.sizing import matched_d_ff, trainable_parameters
from cartlib.paths import TaskPaths
from cartlib.results import publish
from cartlib.train import ValidationSet, resolve_precision, train_cart


class TrainingPairs(NamedTuple):
    texts: list[str]  # training queries
    rows: np.ndarray  # (Q,) item row (items.tsv order) whose identifier each text targets
    kinds: np.ndarray  # (Q,) "reference" or "pseudo"


class TrainStageResult(NamedTuple):
    model: CartModel
    history: pd.DataFrame
    metrics: dict
    figure: object
    mlflow_run_id: str | None


def training_pairs(dataset: schema.Dataset, *, caption_enhancement: bool, seed: int,
                   refs_per_item: int = 0, max_train_items: int = 0) -> TrainingPairs:
    """Train items' reference captions → their item; pseudo-captions of all items (train, val and
    test: val and test items are both corpus items) → their item.

    Reference captions of test and val items (the test and validation queries) are never used.
    `refs_per_item` > 0 keeps only the first that many reference captions of each train item;
    `max_train_items` > 0 keeps that many random train items only (their reference captions and
    pseudo-captions; the pseudo-captions of test and val items are always all kept).
    """
    row_of = pd.Series(np.arange(len(dataset.items)), index=dataset.items["item_id"].to_numpy())
    caps = dataset.captions
    train_ids = dataset.split_items("train")["item_id"].to_numpy()
    train = caps[(caps["kind"] == "reference") & caps["item_id"].isin(set(train_ids))]
    rng = np.random.default_rng(seed)
    pseudo = caps[caps["kind"] == "pseudo"]
    if caption_enhancement:
        _check_pseudo_captions(dataset, pseudo)
    if max_train_items > 0:  # a subset of the train items; test and val items are always kept whole
        keep = set(rng.choice(train_ids, size=min(max_train_items, len(train_ids)), replace=False))
        train = train[train["item_id"].isin(keep)]
        pseudo = pseudo[pseudo["item_id"].isin(keep) | ~pseudo["item_id"].isin(set(train_ids))]
    if refs_per_item > 0:
        train = train[train.groupby("item_id", sort=False).cumcount() < refs_per_item]
    if caption_enhancement:
        train = pd.concat([train, pseudo])
    return TrainingPairs(train["text"].tolist(), row_of[train["item_id"]].to_numpy(), train["kind"].to_numpy())


def load_qrels_val(paths: TaskPaths, dataset: schema.Dataset) -> pd.DataFrame:
    """The validation queries' qrels (empty when the dataset has no validation split)."""
    if not (dataset.items["split"] == "val").any():
        return pd.DataFrame(columns=schema.QREL_COLUMNS)
    return schema.load_qrels(paths.qrels_val, dataset, split="val")


def validation_set(dataset: schema.Dataset, qrels_val: pd.DataFrame, codes: torch.Tensor,
                   level_sizes) -> ValidationSet | None:
    """The validation queries (val items' reference captions) → every relevant val item, ranked
    against a prefix index over the val items alone; None when there are none.

    ``codes (N, L)``: the identifier of every item (items.tsv rows)."""
    val_rows = np.flatnonzero(dataset.items["split"].to_numpy() == "val")
    if not len(val_rows) or qrels_val.empty:
        return None
    rel = M.group_qrels(qrels_val)
    position = pd.Series(np.arange(len(val_rows)), index=dataset.items["item_id"].to_numpy()[val_rows])
    relevant = np.full((len(rel.query_ids), max(map(len, rel.relevant))), -1, dtype=np.int64)  # (Q_val, R), -1 pads
    for q, items in enumerate(rel.relevant):
        found = np.sort(position[list(items)].to_numpy())
        relevant[q, :len(found)] = found
    texts = dataset.captions.set_index("caption_id").loc[rel.query_ids, "text"].tolist()
    gallery = codes[torch.from_numpy(val_rows)]
    return ValidationSet(texts, torch.from_numpy(relevant), PrefixIndex.build(gallery, level_sizes), gallery)


def _check_pseudo_captions(dataset: schema.Dataset, pseudo: pd.DataFrame) -> None:
    """No silent zero: caption enhancement without pseudo-captions of the test gallery adds nothing."""
    test_ids = dataset.split_items("test")["item_id"]
    if len(test_ids) and not pseudo["item_id"].isin(set(test_ids)).any():
        raise ConfigError(
            f"train.caption_enhancement is on, but none of the {len(test_ids)} test-gallery items has a "
            "pseudo-caption, so the run would silently be CART without caption enhancement. Supply them: "
            "put the captioner's output in <data.root>/pseudo_captions.jsonl and set data.n_pseudo > 0 "
            "(docs/datasets.md, 'Pseudo-captions'; a `features` dataset takes `kind: pseudo` rows in "
            "captions.tsv), then rerun the data stage. Or turn it off knowingly: train.caption_enhancement: false.")


def fusion_mode(cfg: TrainConfig) -> FusionMode:
    """``train.fusion`` + ``train.fusion_branches`` → the decoder's cross-attention."""
    if not cfg.fusion:
        return FusionMode.LAST_LAYER
    return {"both": FusionMode.TWO_BRANCH, "coarse": FusionMode.COARSE, "fine": FusionMode.FINE}[cfg.fusion_branches]


def build_model(cfg: TrainConfig, level_sizes) -> tuple[object, CartModel]:
    """MiniLM + the decoder of ``cfg``; with ``match_fusion_params`` a decoder without both fusion
    branches gets the feed-forward width that gives it the fused decoder's trainable-parameter count."""
    tokenizer, encoder = load_text_encoder()
    mode = fusion_mode(cfg)
    d_ff = None
    if cfg.match_fusion_params and mode is not FusionMode.TWO_BRANCH:
        d_ff, _, _ = matched_d_ff(encoder, level_sizes=level_sizes, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                  n_heads=cfg.n_heads, fusion=mode)
    model = CartModel(text_encoder=encoder, freeze_encoder=cfg.freeze_encoder, level_sizes=level_sizes,
                      d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, dropout=cfg.dropout,
                      fusion=mode, d_ff=d_ff)
    return tokenizer, model


def save_bundle(path, *, model: CartModel, cfg: TrainConfig, table: IdentifierTable, history: list[dict],
                key: WeightsKey | None = None) -> None:
    """The trained model with the identity of its identifier table and, given, the key of what
    produced it (:func:`cartlib.cache_key.run_key`). A frozen encoder is not stored."""
    state = {k: v for k, v in model.state_dict().items() if not (cfg.freeze_encoder and k.startswith("encoder."))}
    io.torch_save({"state_dict": state, "train_config": dataclasses.asdict(cfg), "scheme": table.scheme,
                   "level_sizes": list(table.vocab.level_sizes), "identifier_fingerprint": table.fingerprint,
                   "history": history, "cache_key": None if key is None else key.as_dict()}, path)


def load_bundle(path, *, table: IdentifierTable, device: str = "cpu",
                expect_key: WeightsKey | None = None) -> tuple[object, CartModel, dict]:
    """Rebuild a trained model; refuse it if it was trained against another identifier table, or,
    with ``expect_key``, if it was produced under another key (StaleCacheError, before any weights load)."""
    bundle = io.torch_load(path)
    if expect_key is not None:
        expect_key.check(bundle.get("cache_key"), what=f"{path}")
    if bundle["identifier_fingerprint"] != table.fingerprint:
        raise ValueError(f"{path}: this model was trained against identifier table {bundle['identifier_fingerprint'][:12]}… "
                         f"(scheme {bundle['scheme']!r}) but the current table is {table.fingerprint[:12]}… "
                         f"(scheme {table.scheme!r}); rerun the train stage")
    cfg = TrainConfig(**bundle["train_config"])
    tokenizer, model = build_model(cfg, bundle["level_sizes"])
    missing, unexpected = model.load_state_dict(bundle["state_dict"], strict=False)
    bad = [k for k in missing if not (cfg.freeze_encoder and k.startswith("encoder."))]
    if bad or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the model (missing {bad[:3]}, unexpected {unexpected[:3]})")
    return tokenizer, model.to(device).eval(), bundle


def run(params: Params, paths: TaskPaths, *, progress: bool = True, scheme: str | None = None,
        cfg: TrainConfig | None = None, out_name: str = "cart.pt", publish_results: bool = True,
        train_only: bool = False) -> TrainStageResult | None:
    """Train on `scheme`'s identifiers (default: identifiers.scheme) with `cfg` (default: params.train).

    ``train.nproc`` > 1: data-parallel workers (:mod:`cartlib.distributed`) train, this process
    writes the results. ``train_only``: stop after training (the resumable checkpoint is written;
    a rank of a torchrun launch, ``python -m cartlib.distributed``) and return None."""
    check_task(paths.task, params)
    cfg = cfg or params.train
    device = resolve_device(params.base.device)
    dataset = schema.load_dataset(paths.dataset, verify_hashes=False)
    dataset = with_pseudo_captions(dataset, pseudo_captions_path(paths))  # the captions stage's
    table = load_identifiers(paths.data / "identifiers", scheme or params.identifiers.scheme,
                             item_ids=dataset.items["item_id"].to_numpy())
    pairs = training_pairs(dataset, caption_enhancement=cfg.caption_enhancement, seed=params.base.seed,
                           refs_per_item=cfg.refs_per_item, max_train_items=cfg.max_train_items)
    torch.manual_seed(cfg.seed)  # the training seed: initialisation (then batch order and dropout)
    tokenizer, model = build_model(cfg, table.vocab.level_sizes)
    model = model.to(device)
    codes = torch.tensor(table.codes)  # a copy: the stored table is read-only
    val = validation_set(dataset, load_qrels_val(paths, dataset), codes, table.vocab.level_sizes)
    ckpt_dir = paths.models / (out_name.removesuffix(".pt") + "_checkpoints")
    targets = codes[torch.tensor(pairs.rows)]
    key = run_key(cfg, seed=cfg.seed, table=table, texts=pairs.texts, targets=targets, val=val)
    # resumes an interrupted run under the same key; a stale checkpoint is ignored (train_cart says why)
    result = train_cart(model, tokenizer=tokenizer, texts=pairs.texts, codes=targets, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip,
                        consistency_weight=cfg.consistency_weight, seed=cfg.seed, max_length=cfg.max_length,
                        checkpoint_dir=ckpt_dir, progress=progress, val=val, resume=True, key=key,
                        precision=resolve_precision(cfg.precision, device), nproc=cfg.nproc, patience=cfg.patience)
    if train_only:
        return None
    save_bundle(paths.models / out_name, model=result.model, cfg=cfg, table=table, history=result.history, key=key)
    history = pd.DataFrame(result.history)
    last = result.history[-1]
    metrics = {"n_train_texts": len(pairs.texts), "n_pseudo_texts": int((pairs.kinds == "pseudo").sum()),
               "n_val_queries": 0 if val is None else len(val.texts), "final_loss": last["loss"], "final_ce": last["ce"],
               "final_kl": last["kl"], "train_seconds": float(history["seconds"].sum())}
    metrics["trainable_params"] = trainable_parameters(result.model)
    metrics["epochs_trained"] = len(result.history)
    if result.best_epoch is not None:  # the weights kept are the best validation epoch's
        metrics["best_epoch"] = result.best_epoch
        metrics["val_recall_at_1"] = result.history[result.best_epoch - 1]["val_recall_at_1"]
    figure = viz.training_curve(history, title=f"{paths.task}: CART training loss (CE + ω·KL)")
    run_id = None
    if publish_results:
        run_id = publish(paths, "train", params=params, metrics=metrics, tables={"history": history},
                         figures={"training_curve": figure})
    return TrainStageResult(result.model, history, metrics, figure, run_id)
