"""Stage `captions`: every item's pseudo-captions (train, validation and test items) for caption
enhancement, written to `data/<task>/pseudo_captions.tsv` (`cartlib.captions.io`).

Where they come from, in this order:
1. a real dataset that brought its own pseudo-captions (`<data.root>/pseudo_captions.jsonl`, already
   in the dataset's captions.tsv as kind `pseudo`): copied unchanged;
2. `captions.captioner: rules` (built-in benchmark): the synthetic generator's rule-based captions,
   copied unchanged (teaching, and the ablation row);
3. `captions.captioner: learned`: a ClipCap-style captioner (Mokady et al. 2021) trained on the
   reference captions of the train split only, conditioned on the `features` stage's item vectors.
   Those are the dual tower's media-side vectors, so the captioner's errors are tied to the dual
   tower's: what the media tower cannot tell apart, no pseudo-caption will say.

Quality (results/captions/<task>/metrics.json): on validation items (`n_val_items`; 0 and no scores
when the dataset has no validation split) `bleu_4` of each item's first pseudo-caption against all
its references, and on the built-in benchmark `attribute_accuracy` / `attribute_recall`
(`cartlib.captions.attributes`); the same for the nearest-train-item baseline (`baseline_*`, the
same feature space) and, for information only (never used to choose settings), on test items
(`test_*`, `test_baseline_*`).
"""
from __future__ import annotations

import json
import time
from typing import NamedTuple

import numpy as np
import pandas as pd

from cartlib import viz
from cartlib.captions import io as cap_io
from cartlib.captions import learned
from cartlib.captions.quality import caption_quality
from cartlib.config import Params, check_task, resolve_device
from cartlib.data import schema
from cartlib.paths import TaskPaths
from cartlib.results import publish

N_EXAMPLES = 4  # validation items shown in the figure


class CaptionsStageResult(NamedTuple):
    pseudo: pd.DataFrame  # caption_id, item_id, text (what pseudo_captions.tsv holds)
    source: str  # learned | rules | user
    metrics: dict
    history: pd.DataFrame  # captioner training curve (empty unless learned)
    examples: pd.DataFrame  # a few validation (or test) items: references, pseudo-captions, baseline
    notes: list[str]  # where the pseudo-captions come from and what the scores say (also notes.tsv)
    figure: object
    mlflow_run_id: str | None


def run(params: Params, paths: TaskPaths, *, progress: bool = True) -> CaptionsStageResult:
    check_task(paths.task, params)
    cfg, n = params.captions, params.data.n_pseudo
    if cfg.captioner not in ("learned", "rules"):
        raise ValueError(f"captions.captioner must be 'learned' or 'rules', got {cfg.captioner!r}")
    dataset = schema.load_dataset(paths.dataset)
    items, caps = dataset.items.reset_index(drop=True), dataset.captions
    synthetic = dataset.manifest.get("dataset") == "synthetic"
    given = caps.loc[caps["kind"] == "pseudo", ["caption_id", "item_id", "text"]]
    vectors = _vectors(paths, dataset, required=cfg.captioner == "learned" and (synthetic or given.empty))
    timings, history = {}, pd.DataFrame(columns=["epoch", "loss", "val_loss", "seconds"])
    if not synthetic and not given.empty:
        source, pseudo = "user", given
    elif cfg.captioner == "rules":
        if not synthetic:
            raise ValueError(f"{paths.dataset}: captions.captioner=rules needs the built-in benchmark's rule-based "
                             f"captions; a real dataset gets pseudo-captions from the learned captioner or from "
                             f"<data.root>/pseudo_captions.jsonl")
        source, pseudo = "rules", given
    else:
        t0 = time.perf_counter()
        out = learned.learn_and_caption(items=items, captions=caps, vectors=vectors, cfg=cfg, n=n,
                                        seed=params.base.seed, device=resolve_device(params.base.device),
                                        progress=progress)
        timings["captioner_seconds"] = round(time.perf_counter() - t0, 2)
        history = pd.DataFrame(out.trained.history)
        source, pseudo = "learned", pd.DataFrame(
            [(f"{i}#p{j}", i, t) for i, texts in zip(items["item_id"], out.captions) for j, t in enumerate(texts)],
            columns=cap_io.COLUMNS)
    pseudo = cap_io.write_pseudo_captions(cap_io.pseudo_captions_path(paths), pseudo, items=items)

    metrics = {"learned_captioner": int(source == "learned"), "n_items": len(items),
               "n_pseudo_captions": len(pseudo), "n_items_without_pseudo": int((~items["item_id"].isin(pseudo["item_id"])).sum())}
    if source == "learned":
        metrics.update(vocabulary_size=len(out.trained.vocab), n_train_captions=len(out.corpus.texts),
                       final_train_loss=round(float(history["loss"].iloc[-1]), 4))
        if history["val_loss"].notna().any():
            metrics["final_val_loss"] = round(float(history["val_loss"].iloc[-1]), 4)
            best = history.loc[history["val_loss"].idxmin()]  # the epoch whose weights were kept
            metrics["best_epoch"], metrics["best_val_loss"] = int(best["epoch"]), round(float(best["val_loss"]), 4)
    metrics.update(timings)
    quality, examples = _quality(task=paths.task, items=items, caps=caps, pseudo=pseudo, vectors=vectors, n=n,
                                 synthetic=synthetic)
    metrics.update(quality)
    notes = notes_for(source, metrics)
    figure = viz.caption_examples(examples, title=f"{paths.task}: pseudo-captions ({source})")
    run_id = publish(paths, "captions", params=params, metrics=metrics,
                     tables={"history": history, "examples": examples, "notes": pd.DataFrame({"note": notes})}, figures={"examples": figure})
    return CaptionsStageResult(pseudo, source, metrics, history, examples, notes, figure, run_id)


def _vectors(paths: TaskPaths, dataset: schema.Dataset, *, required: bool) -> np.ndarray | None:
    """The `features` stage's item vectors (items.tsv order), or None when not needed and absent."""
    if not required and not paths.features.is_dir():
        return None
    from cartlib.data.features import load_features

    return load_features(paths.features, dataset).items


def _quality(*, task: str, items: pd.DataFrame, caps: pd.DataFrame, pseudo: pd.DataFrame, vectors, n: int,
             synthetic: bool) -> tuple[dict, pd.DataFrame]:
    refs = learned.references(items, caps)
    mine = cap_io.by_item(pseudo)
    attrs = [json.loads(a) for a in items["attributes"]] if synthetic else None
    out: dict = {}
    show = None
    for split, prefix in ((learned.VAL_SPLIT, ""), ("test", "test_")):
        rows = np.flatnonzero((items["split"] == split).to_numpy())
        rows = rows[[bool(refs[r]) and bool(mine.get(items["item_id"].iloc[r])) for r in rows]]
        out[f"n_{split}_items"] = len(rows)
        if not len(rows):
            continue
        a = [attrs[r] for r in rows] if attrs else None
        r_refs = [refs[r] for r in rows]
        r_mine = [mine[items["item_id"].iloc[r]] for r in rows]
        out.update(caption_quality(r_mine, r_refs, attributes=a, task=task, prefix=prefix))
        base = None
        if vectors is not None and n and (items["split"] == learned.TRAIN_SPLIT).any():
            base = learned.nearest_train_captions(items=items, captions=caps, vectors=vectors, n=n, rows=rows)
            out.update(caption_quality(base, r_refs, attributes=a, task=task, prefix=f"{prefix}baseline_"))
            if a is not None:
                out[f"{prefix}beats_baseline_attribute_accuracy"] = int(
                    out[f"{prefix}attribute_accuracy"] > out[f"{prefix}baseline_attribute_accuracy"])
        if show is None:  # validation items when there are any, else test items
            k = min(N_EXAMPLES, len(rows))
            show = pd.DataFrame({"item_id": items["item_id"].iloc[rows[:k]].to_numpy(), "split": split,
                                 "reference": [r[0] for r in r_refs[:k]],
                                 "pseudo": [" | ".join(m) for m in r_mine[:k]],
                                 "baseline": [" | ".join(b) for b in base[:k]] if base else ""})
    if show is None:
        show = pd.DataFrame(columns=["item_id", "split", "reference", "pseudo", "baseline"])
    return out, show


def notes_for(source: str, metrics: dict) -> list[str]:
    """Plain-language notes on the source of the pseudo-captions and on their scores."""
    notes = {
        "learned": "pseudo-captions from a ClipCap-style captioner trained on the train split's reference captions, "
                   "conditioned on the features stage's item vectors (the dual tower's media side): its errors are "
                   "tied to the dual tower's",
        "rules": "pseudo-captions copied from the built-in benchmark's rule-based captioner (reads the ground-truth "
                 "attributes, errs at data.captioner_error_rate): teaching and ablation only",
        "user": "pseudo-captions copied from the user's pseudo_captions.jsonl (they override the learned captioner)",
    }
    out = [notes[source]]
    if not metrics.get(f"n_{learned.VAL_SPLIT}_items"):
        out.append(f"no {learned.VAL_SPLIT!r} items with references and pseudo-captions: validation scores skipped")
    if "beats_baseline_attribute_accuracy" in metrics:
        verdict = "beats" if metrics["beats_baseline_attribute_accuracy"] else "does NOT beat"
        out.append(f"on validation items the {source} captioner {verdict} the nearest-train-item baseline on "
                   f"attribute_accuracy ({metrics['attribute_accuracy']} vs {metrics['baseline_attribute_accuracy']})")
    return out
