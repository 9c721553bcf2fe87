"""The learned captioner end to end: what it trains on (reference captions of the train split only),
its pseudo-captions for every item, and the nearest-train-item baseline it has to beat.

The media reach the captioner only as the `features` stage's item vectors (the dual tower's media
side), so its mistakes are the dual tower's mistakes too; the nearest-train-item baseline reads the
same vectors, so the comparison isolates what composing a caption adds over copying a neighbour's.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from cartlib.captions import model as M

TRAIN_SPLIT = "train"  # the only split whose reference captions the captioner trains on
VAL_SPLIT = "val"  # its settings are chosen on these items' reference captions (scored, never trained on)


class Corpus(NamedTuple):
    rows: np.ndarray  # (C,) item row (into items / vectors) of each caption
    texts: list[str]  # (C,) reference caption texts


class LearnedCaptions(NamedTuple):
    captions: list[list[str]]  # n per item, items.tsv order
    trained: M.TrainedCaptioner
    corpus: Corpus  # what it was trained on


def references(items: pd.DataFrame, captions: pd.DataFrame) -> list[list[str]]:
    """Each item's reference caption texts, in file order (items.tsv order; [] for none)."""
    refs = captions[captions["kind"] == "reference"].groupby("item_id", sort=False)["text"].apply(list)
    return [refs.get(i, []) for i in items["item_id"]]


def corpus(items: pd.DataFrame, captions: pd.DataFrame, *, split: str) -> Corpus:
    """The reference captions of the items in `split`, with their item rows (row = position in `items`)."""
    refs = references(items, captions)
    rows = np.flatnonzero(items["split"].to_numpy() == split)
    pairs = [(r, t) for r in rows for t in refs[r]]
    return Corpus(np.array([r for r, _ in pairs], dtype=np.int64), [t for _, t in pairs])


def learn_and_caption(*, items: pd.DataFrame, captions: pd.DataFrame, vectors: np.ndarray, cfg, n: int, seed: int,
                      device: str = "cpu", progress: bool = True) -> LearnedCaptions:
    """Train on the train split's reference captions; write `n` pseudo-captions for every item."""
    if len(vectors) != len(items):
        raise ValueError(f"{len(vectors)} item vectors for {len(items)} items")
    train = corpus(items, captions, split=TRAIN_SPLIT)
    if not len(train.texts):
        raise ValueError(f"no reference captions of {TRAIN_SPLIT!r} items: nothing to train the captioner on")
    val = corpus(items, captions, split=VAL_SPLIT)
    trained = M.train_captioner(vectors=vectors[train.rows], texts=train.texts, cfg=cfg, seed=seed,
                                val_vectors=vectors[val.rows] if len(val.texts) else None, val_texts=val.texts,
                                device=device, progress=progress)
    out = M.generate(trained, vectors, n=n, decoding=cfg.decoding, temperature=cfg.temperature,
                     max_length=cfg.max_length, seed=seed, device=device, progress=progress) if n else [[] for _ in items.index]
    return LearnedCaptions(out, trained, train)


def nearest_train_captions(*, items: pd.DataFrame, captions: pd.DataFrame, vectors: np.ndarray, n: int,
                           rows: Sequence[int] | None = None) -> list[list[str]]:
    """The baseline: item → the first `n` reference captions of its nearest train item (cosine of the
    same vectors; a train item is its own nearest). Only for `rows` (default: all items)."""
    rows = np.arange(len(items)) if rows is None else np.asarray(rows, dtype=np.int64)
    train_rows = np.flatnonzero(items["split"].to_numpy() == TRAIN_SPLIT)
    if not len(train_rows):
        raise ValueError(f"no {TRAIN_SPLIT!r} items: no nearest train item")
    refs = references(items, captions)
    nearest = train_rows[M.nearest_rows(vectors[rows], vectors[train_rows])]
    return [[refs[j][k % len(refs[j])] for k in range(n)] if refs[j] else [] for j in nearest]
