"""Stage `data`: build one task's dataset in the on-disk schema (cartlib.data.schema).

On the built-in benchmark the qrels are complete: a test (val) query is relevant to every test (val)
item consistent with everything its caption states (`synthetic.relevant_items`, exact: from what the
generator recorded, not from the text)."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import pandas as pd

from cartlib import metrics as M, viz
from cartlib.config import Params, check_task
from cartlib.data import schema
from cartlib.paths import TaskPaths
from cartlib.results import publish


class DataStageResult(NamedTuple):
    dataset: schema.Dataset
    metrics: dict
    figure: object  # sample items with captions
    mlflow_run_id: str | None


def run(params: Params, paths: TaskPaths, *, progress: bool = True) -> DataStageResult:
    check_task(paths.task, params)
    cfg = params.data
    if cfg.dataset != "synthetic":
        return _run_real(params, paths, progress=progress)
    from tqdm.auto import tqdm

    from cartlib.data import synthetic

    start = time.perf_counter()
    n_items = cfg.n_train + cfg.n_test + cfg.n_val
    writer = schema.DatasetWriter(paths.dataset, task=paths.task, dataset="synthetic", n_items=n_items,
                                  media_shape=synthetic.media_shape(paths.task),
                                  media_dtype=str(synthetic.media_dtype(paths.task)))
    chunks = synthetic.generate(task=paths.task, n_train=cfg.n_train, n_test=cfg.n_test, n_val=cfg.n_val,
                                seed=params.base.seed, n_captions=cfg.n_captions, n_pseudo=cfg.n_pseudo,
                                captioner_error_rate=cfg.captioner_error_rate, chunk_size=cfg.chunk_size)
    gallery = {split: _Gallery([], [], []) for split in schema.QUERY_SPLITS}  # what complete qrels need
    with tqdm(total=n_items, desc=f"render {paths.task}", unit="item", disable=not progress) as bar:
        for chunk in chunks:
            writer.add(item_ids=chunk.item_ids, splits=chunk.splits, attributes=chunk.attributes,
                       captions=chunk.captions, pseudo_captions=chunk.pseudo_captions, media=chunk.media)
            for i, split in enumerate(chunk.splits):
                if split in gallery:
                    gallery[split].item_ids.append(chunk.item_ids[i])
                    gallery[split].attributes.append(chunk.attributes[i])
                    gallery[split].statements.append(chunk.statements[i])
            bar.update(len(chunk.item_ids))
    qrels = {split: complete_qrels(task=paths.task, gallery=g) for split, g in gallery.items()}
    writer.close(qrels_path=paths.qrels, qrels_val_path=paths.qrels_val, qrels=qrels)
    seconds = time.perf_counter() - start
    dataset = schema.load_dataset(paths.dataset)
    caps = dataset.captions
    metrics = {
        "n_items": n_items, "n_train": cfg.n_train, "n_test": cfg.n_test, "n_val": cfg.n_val,
        "n_reference_captions": int((caps["kind"] == "reference").sum()),
        "n_pseudo_captions": int((caps["kind"] == "pseudo").sum()),
        "n_test_queries": int(len(dataset.queries("test"))), "n_val_queries": int(len(dataset.queries("val"))),
        **_relevance_metrics(paths, dataset),
        "vocabulary_size": int(len(set(" ".join(caps["text"]).lower().split()))),
        "mean_caption_words": float(caps["text"].str.split().str.len().mean()),
        "seconds": round(seconds, 2),
    }
    return _finish(params, paths, dataset, metrics)


class _Gallery(NamedTuple):
    """The test (or val) items of a generated dataset, in file order."""
    item_ids: list[str]
    attributes: list[dict]
    statements: list[list]  # per item, the synthetic.Statement of each reference caption


def complete_qrels(*, task: str, gallery: _Gallery) -> pd.DataFrame:
    """Every (caption_id, item_id) of the gallery where the item is consistent with the caption's
    statement; caption ids follow the writer's `<item_id>-c<j>`."""
    from cartlib.data import synthetic

    query_ids = [f"{item}-c{j}" for item, sts in zip(gallery.item_ids, gallery.statements) for j in range(len(sts))]
    statements = [st for sts in gallery.statements for st in sts]
    relevant = synthetic.relevant_items(task=task, statements=statements, attributes=gallery.attributes)
    rows = [(q, gallery.item_ids[i]) for q, found in zip(query_ids, relevant) for i in found]
    return pd.DataFrame(rows, columns=schema.QREL_COLUMNS)


def _relevance_metrics(paths: TaskPaths, dataset: schema.Dataset) -> dict:
    """Validate both qrels files against the dataset; how many items each query has (test, `val_…`)."""
    out = {}
    for split, path, prefix in (("test", paths.qrels, ""), ("val", paths.qrels_val, "val_")):
        qrels = schema.load_qrels(path, dataset, split=split)
        if len(qrels):
            out.update({prefix + k: v for k, v in M.relevance_stats(qrels).items()})
    return out


def _run_real(params: Params, paths: TaskPaths, *, progress: bool) -> DataStageResult:
    """A public dataset from local files (cartlib.data.real), written in the same schema."""
    from cartlib.data import real

    cfg = params.data
    start = time.perf_counter()
    summary = real.build_real_dataset(dataset=cfg.dataset, root=cfg.root, task_folder=paths, task=paths.task,
                                      on_missing=cfg.on_missing, max_items=cfg.max_items or None,
                                      n_captions=None, n_pseudo=cfg.n_pseudo,
                                      progress=progress)
    dataset = schema.load_dataset(paths.dataset)
    metrics = {"n_items": summary.n_items, "n_train": summary.n_train, "n_test": summary.n_test,
               "n_val": summary.n_val,
               "n_reference_captions": int((dataset.captions["kind"] == "reference").sum()),
               "n_pseudo_captions": int((dataset.captions["kind"] == "pseudo").sum()),
               "n_test_queries": int(len(dataset.queries("test"))), "n_val_queries": int(len(dataset.queries("val"))),
               **_relevance_metrics(paths, dataset), "n_missing": summary.n_missing,
               "n_unreadable": summary.n_unreadable, "n_excluded": summary.n_excluded,
               "seconds": round(time.perf_counter() - start, 2)}
    if summary.missing or summary.unreadable:
        print(f"skipped {summary.n_missing} missing and {summary.n_unreadable} unreadable media files:",
              *(summary.missing + summary.unreadable)[:20], sep="\n  ")
    return _finish(params, paths, dataset, metrics)


def _finish(params: Params, paths: TaskPaths, dataset: schema.Dataset, metrics: dict) -> DataStageResult:
    figure = sample_figure(dataset)
    run_id = publish(paths, "data", params=params, metrics=metrics, figures={"samples": figure})
    return DataStageResult(dataset, metrics, figure, run_id)


def sample_figure(dataset: schema.Dataset, *, n: int = 4):
    items = dataset.split_items("test").head(n)
    caps = dataset.captions.set_index("caption_id")["text"]
    refs = [caps[f"{i}-c0"] for i in items["item_id"]]
    pseudo = [caps.get(f"{i}-p0", "(none)") for i in items["item_id"]]
    if dataset.media is None:  # file-based real dataset: show the captions with the file names
        return viz.caption_samples(items["media_path"].tolist(), refs, pseudo, title=f"{dataset.task}: sample items")
    return viz.media_samples(dataset.task, np.asarray(dataset.media[items["media_index"].to_numpy()]), refs, pseudo, n=n)
