"""`data/<task>/pseudo_captions.tsv`: every item's pseudo-captions, written by the `captions` stage.

```
caption_id  item_id  text        one row per pseudo-caption; caption ids unique
```
Learned captions are named `<item_id>#p<j>`; copied ones (the rule-based captioner of the built-in
benchmark, a user's `pseudo_captions.jsonl`) keep their dataset caption id (`<item_id>-p<j>`).
`read_pseudo_captions` validates the file against the dataset's items (the stages that train on
pseudo-captions read them through it); every problem raises `DataFormatError` naming the file and line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from cartlib import io
from cartlib.data.schema import DataFormatError, read_tsv

COLUMNS = ["caption_id", "item_id", "text"]
FILE_NAME = "pseudo_captions.tsv"


def pseudo_captions_path(paths) -> Path:
    """Where the `captions` stage writes one task's pseudo-captions (`paths`: a `TaskPaths`)."""
    return Path(paths.data) / FILE_NAME


def _item_ids(items) -> set[str]:
    if isinstance(items, pd.DataFrame):
        return set(items["item_id"].astype(str))
    return {str(i) for i in items}


def validate(frame: pd.DataFrame, *, items: Iterable[str] | pd.DataFrame, name: str) -> pd.DataFrame:
    """Check columns, ids and texts; `name` (a path) goes into every error. Returns the COLUMNS in order."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataFormatError(f"{name}: missing column(s) {missing}; expected header {COLUMNS}")
    frame = frame[COLUMNS].reset_index(drop=True)

    def fail(mask, what):
        row = int(mask.to_numpy().argmax())
        raise DataFormatError(f"{name}: line {row + 2} (caption_id {frame['caption_id'].iloc[row]!r}): {what}")

    known = _item_ids(items)
    unknown = ~frame["item_id"].isin(known)
    if unknown.any():
        fail(unknown, f"item_id {frame.loc[unknown, 'item_id'].iloc[0]!r} is not an item of the dataset")
    empty = frame["text"].str.strip() == ""
    if empty.any():
        fail(empty, "empty caption text")
    bad_text = frame["text"].str.contains(r"[\t\n\r]", regex=True)
    if bad_text.any():
        fail(bad_text, "caption text holds a tab or line break")
    dup = frame["caption_id"].duplicated()
    if dup.any():
        fail(dup, "duplicate caption_id")
    no_id = frame["caption_id"].str.strip() == ""
    if no_id.any():
        fail(no_id, "empty caption_id")
    return frame


def write_pseudo_captions(path: str | os.PathLike, frame: pd.DataFrame, *,
                          items: Iterable[str] | pd.DataFrame) -> Path:
    """Validate and write atomically (texts collapsed to one line first, as the dataset's captions are);
    returns the rows as written, so a caller needs no second read."""
    frame = frame.assign(text=frame["text"].map(lambda t: " ".join(str(t).split())))
    frame = validate(frame.astype({"caption_id": str, "item_id": str}), items=items, name=str(path))
    io.write_dataframe_tsv(path, frame)
    return frame.reset_index(drop=True)


def read_pseudo_captions(path: str | os.PathLike, *, items: Iterable[str] | pd.DataFrame) -> pd.DataFrame:
    """Read and validate `pseudo_captions.tsv` against the dataset's item ids (or its items table)."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: file not found (run the `captions` stage first)")
    return validate(read_tsv(path, COLUMNS, {}), items=items, name=str(path))


def by_item(frame: pd.DataFrame) -> dict[str, list[str]]:
    """item_id → its pseudo-caption texts, in file order."""
    return {k: list(v) for k, v in frame.groupby("item_id", sort=False)["text"]}


def with_pseudo_captions(dataset, path: str | os.PathLike):
    """`dataset` (a `schema.Dataset`) whose pseudo-captions are those of the `captions` stage's file.

    The stages that use pseudo-captions (train, baselines, compare/ablations) read them through this,
    so the captioner that made them is the `captions` stage's, never the generator's stand-in.
    """
    pseudo = read_pseudo_captions(path, items=dataset.items)
    refs = dataset.captions[dataset.captions["kind"] != "pseudo"]
    rows = pseudo.assign(kind="pseudo")[list(refs.columns)]
    return dataset._replace(captions=pd.concat([refs, rows], ignore_index=True))


def write_dataset_pseudo_captions(dataset, path: str | os.PathLike) -> pd.DataFrame:
    """Write the dataset's own pseudo-captions (the built-in rule captioner's, or a user's
    `pseudo_captions.jsonl` loaded with a real dataset) as the `captions` stage's file."""
    rows = dataset.captions[dataset.captions["kind"] == "pseudo"][COLUMNS]
    return write_pseudo_captions(path, rows, items=dataset.items)
