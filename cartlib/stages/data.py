"""Stage `data`: build one task's dataset in the on-disk schema (cartlib.data.schema)."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from cartlib import viz
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
    n_items = cfg.n_train + cfg.n_test
    writer = schema.DatasetWriter(paths.dataset, task=paths.task, dataset="synthetic", n_items=n_items,
                                  media_shape=synthetic.media_shape(paths.task),
                                  media_dtype=str(synthetic.media_dtype(paths.task)))
    chunks = synthetic.generate(task=paths.task, n_train=cfg.n_train, n_test=cfg.n_test, seed=params.base.seed,
                                n_captions=cfg.n_captions, n_pseudo=cfg.n_pseudo,
                                captioner_error_rate=cfg.captioner_error_rate, chunk_size=cfg.chunk_size)
    with tqdm(total=n_items, desc=f"render {paths.task}", unit="item", disable=not progress) as bar:
        for chunk in chunks:
            writer.add(item_ids=chunk.item_ids, splits=chunk.splits, attributes=chunk.attributes,
                       captions=chunk.captions, pseudo_captions=chunk.pseudo_captions, media=chunk.media)
            bar.update(len(chunk.item_ids))
    writer.close(qrels_path=paths.qrels)
    seconds = time.perf_counter() - start
    dataset = schema.load_dataset(paths.dataset)
    schema.load_qrels(paths.qrels, dataset)
    caps = dataset.captions
    metrics = {
        "n_items": n_items, "n_train": cfg.n_train, "n_test": cfg.n_test,
        "n_reference_captions": int((caps["kind"] == "reference").sum()),
        "n_pseudo_captions": int((caps["kind"] == "pseudo").sum()),
        "n_test_queries": int(len(dataset.queries("test"))),
        "vocabulary_size": int(len(set(" ".join(caps["text"]).lower().split()))),
        "mean_caption_words": float(caps["text"].str.split().str.len().mean()),
        "seconds": round(seconds, 2),
    }
    return _finish(params, paths, dataset, metrics)


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
    schema.load_qrels(paths.qrels, dataset)
    metrics = {"n_items": summary.n_items, "n_train": summary.n_train, "n_test": summary.n_test,
               "n_reference_captions": int((dataset.captions["kind"] == "reference").sum()),
               "n_pseudo_captions": int((dataset.captions["kind"] == "pseudo").sum()),
               "n_test_queries": int(len(dataset.queries("test"))), "n_missing": summary.n_missing,
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
