"""The on-disk format of one task's dataset, shared by the built-in benchmark and real datasets.

```
data/<task>/dataset/
    manifest.json   {"schema_version": 2, "task", "dataset", "n_items", "n_train", "n_test", "n_val",
                     "media": {"file": "media.npy", "shape": [N, ...], "dtype": "uint8"} | null,
                     "sha256": {file name: hex digest}}
    items.tsv       item_id  split(train|test|val)  media_index  media_path  attributes(JSON)
    captions.tsv    caption_id  item_id  kind(reference|pseudo)  text
    media.npy       rendered media, row i = items.tsv row with media_index i (synthetic only;
                    real datasets give `media_path` relative to data.root instead)
data/<task>/qrels.tsv       query_id  item_id   (the test queries: reference captions of test items)
data/<task>/qrels_val.tsv   query_id  item_id   (the validation queries: reference captions of val items)
```
Queries are captions: a test item's reference captions are the test queries (query_id =
caption_id), ranked against the test items alone; a val item's are the validation queries, ranked
against the val items alone (the only queries any choice may be tuned on); train items' reference
captions are training queries. Val and test items are both in the corpus (identifiers,
pseudo-captions), but no stage trains on their reference captions. Pseudo-captions (from the
captioner) are the caption-enhancement inputs. A qrels file lists every relevant item of a query,
one row each (the built-in benchmark's are complete; real datasets list the caption's own item).
Schema 2 added the val split, `n_val` and qrels_val.tsv. The folder is written under a temporary
name and renamed when complete, so a crash never leaves a dataset that looks whole.
`load_dataset` validates everything (files, columns, ids, hashes) before returning.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cartlib import io

SCHEMA_VERSION = 2  # 2: the "val" split, manifest n_val, qrels_val.tsv
ITEM_COLUMNS = ["item_id", "split", "media_index", "media_path", "attributes"]
CAPTION_COLUMNS = ["caption_id", "item_id", "kind", "text"]
QREL_COLUMNS = ["query_id", "item_id"]
SPLITS = ("train", "test", "val")
QUERY_SPLITS = ("test", "val")  # splits whose reference captions are queries (with qrels)
KINDS = ("reference", "pseudo")


class DataFormatError(ValueError):
    """A dataset file is missing, corrupted or does not follow the schema."""


class Dataset(NamedTuple):
    folder: Path
    manifest: dict
    items: pd.DataFrame  # ITEM_COLUMNS, one row per item, test items first (then train, then val)
    captions: pd.DataFrame  # CAPTION_COLUMNS
    media: np.ndarray | None  # memory-mapped (N, ...) or None for file-based real datasets

    @property
    def task(self) -> str:
        return self.manifest["task"]

    def split_items(self, split: str) -> pd.DataFrame:
        return self.items[self.items["split"] == split]

    def queries(self, split: str, kind: str = "reference") -> pd.DataFrame:
        """Captions of `kind` whose item is in `split` (test + reference = the test queries)."""
        ids = set(self.split_items(split)["item_id"])
        sel = (self.captions["kind"] == kind) & self.captions["item_id"].isin(ids)
        return self.captions[sel]


class DatasetWriter:
    """Stream items into `folder` chunk by chunk; `close()` makes the folder appear atomically."""

    def __init__(self, folder: str | os.PathLike, *, task: str, dataset: str, n_items: int,
                 media_shape: tuple[int, ...] | None, media_dtype: str | None):
        self.folder = Path(folder)
        self.tmp = self.folder.with_name(f".{self.folder.name}.tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.task, self.dataset, self.n_items = task, dataset, n_items
        self.media = None
        if media_shape is not None:
            self.media = np.lib.format.open_memmap(
                self.tmp / "media.npy", mode="w+", dtype=np.dtype(media_dtype), shape=(n_items, *media_shape))
        self._items_f = open(self.tmp / "items.tsv", "w", newline="", encoding="utf-8")
        self._caps_f = open(self.tmp / "captions.tsv", "w", newline="", encoding="utf-8")
        self._items = csv.writer(self._items_f, delimiter="\t", lineterminator="\n")
        self._caps = csv.writer(self._caps_f, delimiter="\t", lineterminator="\n")
        self._items.writerow(ITEM_COLUMNS)
        self._caps.writerow(CAPTION_COLUMNS)
        self._qrels: dict[str, list[tuple[str, str]]] = {s: [] for s in QUERY_SPLITS}  # own item of each query
        self.n_written = 0
        self.counts = {s: 0 for s in SPLITS}

    def add(self, *, item_ids, splits, attributes, captions, pseudo_captions, media=None, media_paths=None):
        n = len(item_ids)
        start = self.n_written
        if self.media is not None:
            self.media[start:start + n] = media
        for i in range(n):
            item_id, split = item_ids[i], splits[i]
            path = "" if media_paths is None else media_paths[i]
            index = start + i if self.media is not None else -1
            self._items.writerow([item_id, split, index, path, json.dumps(attributes[i], sort_keys=True)])
            for j, text in enumerate(captions[i]):
                cid = f"{item_id}-c{j}"
                self._caps.writerow([cid, item_id, "reference", _clean(text)])
                if split in self._qrels:
                    self._qrels[split].append((cid, item_id))
            for j, text in enumerate(pseudo_captions[i]):
                self._caps.writerow([f"{item_id}-p{j}", item_id, "pseudo", _clean(text)])
            self.counts[split] += 1
        self.n_written += n

    def close(self, *, qrels_path: str | os.PathLike, qrels_val_path: str | os.PathLike | None = None,
              qrels: dict[str, pd.DataFrame] | None = None) -> Path:
        """Finish the folder and write the qrels of the test (and val) queries. By default a query's
        only relevant item is its own; ``qrels[split]`` replaces that with a complete list, which must
        name the same queries, items of that split only, and each query's own item."""
        if self.n_written != self.n_items:
            raise DataFormatError(f"{self.folder}: wrote {self.n_written} items, expected {self.n_items}")
        self._items_f.close()
        self._caps_f.close()
        media_meta = None
        if self.media is not None:
            self.media.flush()
            media_meta = {"file": "media.npy", "shape": list(self.media.shape), "dtype": str(self.media.dtype)}
            del self.media
        if qrels_val_path is None and self.counts["val"]:
            raise DataFormatError(f"{self.folder}: {self.counts['val']} val items but no qrels_val_path to write "
                                  f"their queries' qrels to")
        frames = {s: self._final_qrels(s, (qrels or {}).get(s)) for s in QUERY_SPLITS}
        files = ["items.tsv", "captions.tsv"] + (["media.npy"] if media_meta else [])
        manifest = {
            "schema_version": SCHEMA_VERSION, "task": self.task, "dataset": self.dataset,
            "n_items": self.n_items, "n_train": self.counts["train"], "n_test": self.counts["test"],
            "n_val": self.counts["val"], "media": media_meta, "sha256": {f: io.sha256_file(self.tmp / f) for f in files},
        }
        io.write_json(self.tmp / "manifest.json", manifest)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.tmp, self.folder)
        io.write_dataframe_tsv(qrels_path, frames["test"])
        if qrels_val_path is not None:
            io.write_dataframe_tsv(qrels_val_path, frames["val"])
        return self.folder

    def _final_qrels(self, split: str, complete: pd.DataFrame | None) -> pd.DataFrame:
        own = pd.DataFrame(self._qrels[split], columns=QREL_COLUMNS)
        if complete is None:
            return own
        complete = complete[QREL_COLUMNS].drop_duplicates().reset_index(drop=True)
        if set(complete["query_id"]) != set(own["query_id"]):
            raise DataFormatError(f"{self.folder}: complete {split} qrels name other queries than the {split} "
                                  f"items' reference captions")
        pairs = set(zip(complete["query_id"], complete["item_id"]))
        lost = [q for q in own.itertuples(index=False) if (q.query_id, q.item_id) not in pairs]
        if lost:
            raise DataFormatError(f"{self.folder}: complete {split} qrels leave out query {lost[0].query_id!r}'s "
                                  f"own item {lost[0].item_id!r}")
        return complete


def _clean(text: str) -> str:
    # Tabs/newlines would break the TSV; captions are single lines by contract.
    return " ".join(str(text).split())


def load_dataset(folder: str | os.PathLike, *, verify_hashes: bool = True) -> Dataset:
    """Read and validate a dataset folder; every problem raises `DataFormatError` naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: dataset folder not found (run the `data` stage first)")
    try:
        manifest = io.read_json(folder / "manifest.json")
    except (FileNotFoundError, ValueError) as e:
        raise DataFormatError(str(e)) from None
    for key in ("schema_version", "task", "n_items", "sha256"):
        if key not in manifest:
            raise DataFormatError(f"{folder / 'manifest.json'}: missing field {key!r}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise DataFormatError(f"{folder / 'manifest.json'}: schema_version {manifest['schema_version']}, "
                              f"this cartlib reads {SCHEMA_VERSION}")
    for name, digest in manifest["sha256"].items():
        path = folder / name
        if not path.exists():
            raise DataFormatError(f"{path}: file listed in the manifest is missing")
        if verify_hashes and io.sha256_file(path) != digest:
            raise DataFormatError(f"{path}: content does not match the manifest's sha256 (corrupted or edited)")
    items = read_tsv(folder / "items.tsv", ITEM_COLUMNS, {"media_index": int})
    captions = read_tsv(folder / "captions.tsv", CAPTION_COLUMNS, {})
    n = manifest["n_items"]
    if len(items) != n:
        raise DataFormatError(f"{folder / 'items.tsv'}: {len(items)} rows, manifest says n_items={n}")
    _check_values(folder / "items.tsv", items, "split", SPLITS)
    counts = items["split"].value_counts()
    for split in SPLITS:
        if manifest.get(f"n_{split}", 0) != int(counts.get(split, 0)):
            raise DataFormatError(f"{folder / 'manifest.json'}: n_{split}={manifest.get(f'n_{split}')}, but "
                                  f"items.tsv has {int(counts.get(split, 0))} {split} items")
    _check_values(folder / "captions.tsv", captions, "kind", KINDS)
    _check_unique(folder / "items.tsv", items, "item_id")
    _check_unique(folder / "captions.tsv", captions, "caption_id")
    orphans = ~captions["item_id"].isin(set(items["item_id"]))
    if orphans.any():
        bad = captions.loc[orphans, "item_id"].iloc[0]
        raise DataFormatError(f"{folder / 'captions.tsv'}: {int(orphans.sum())} caption(s) name unknown item_id, e.g. {bad!r}")
    empty = captions["text"].str.strip() == ""
    if empty.any():
        raise DataFormatError(f"{folder / 'captions.tsv'}: empty caption text for caption_id {captions.loc[empty, 'caption_id'].iloc[0]!r}")
    media = None
    if manifest.get("media"):
        meta = manifest["media"]
        try:
            media = np.load(folder / meta["file"], mmap_mode="r")
        except Exception as e:
            raise DataFormatError(f"{folder / meta['file']}: cannot be read as .npy ({e})") from None
        if list(media.shape) != list(meta["shape"]) or str(media.dtype) != meta["dtype"]:
            raise DataFormatError(f"{folder / meta['file']}: shape {media.shape} dtype {media.dtype}, "
                                  f"manifest says {tuple(meta['shape'])} {meta['dtype']}")
        idx = items["media_index"].to_numpy()
        if (idx < 0).any() or (idx >= len(media)).any():
            raise DataFormatError(f"{folder / 'items.tsv'}: media_index out of range [0, {len(media)})")
    return Dataset(folder, manifest, items, captions, media)


def load_qrels(path: str | os.PathLike, dataset: Dataset | None = None, *, split: str = "test") -> pd.DataFrame:
    """Read `qrels.tsv` (``split="val"``: `qrels_val.tsv`), one row per relevant (query, item); with
    `dataset`, check every item is a `split` item and every query a reference caption of one."""
    if split not in QUERY_SPLITS:
        raise ValueError(f"split must be one of {QUERY_SPLITS}, got {split!r}")
    path = Path(path)
    qrels = read_tsv(path, QREL_COLUMNS, {})
    if dataset is not None:
        split_items = set(dataset.split_items(split)["item_id"])
        bad = ~qrels["item_id"].isin(split_items)
        if bad.any():
            raise DataFormatError(f"{path}: item_id {qrels.loc[bad, 'item_id'].iloc[0]!r} is not a {split} item")
        known = set(dataset.queries(split)["caption_id"])
        bad = ~qrels["query_id"].isin(known)
        if bad.any():
            raise DataFormatError(f"{path}: query_id {qrels.loc[bad, 'query_id'].iloc[0]!r} is not a reference "
                                  f"caption of a {split} item")
        dup = qrels.duplicated()
        if dup.any():
            raise DataFormatError(f"{path}: duplicate row {tuple(qrels[dup].iloc[0])}")
    return qrels


def read_tsv(path: Path, columns: list[str], dtypes: dict) -> pd.DataFrame:
    """A header-first TSV of the dataset formats: strings kept as written, `dtypes` cast, `columns` in order;
    a missing file, a parse error, a missing column or a bad integer raises `DataFormatError` naming the file."""
    if not path.exists():
        raise DataFormatError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
    except Exception as e:
        raise DataFormatError(f"{path}: cannot be parsed as TSV ({e})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {missing}; expected header {columns}")
    for col, typ in dtypes.items():
        try:
            frame[col] = frame[col].astype(typ)
        except ValueError:
            raise DataFormatError(f"{path}: column {col!r} must hold integers") from None
    return frame[columns]


def _check_values(path: Path, frame: pd.DataFrame, col: str, allowed: tuple[str, ...]) -> None:
    bad = ~frame[col].isin(allowed)
    if bad.any():
        raise DataFormatError(f"{path}: column {col!r} has value {frame.loc[bad, col].iloc[0]!r}; expected one of {list(allowed)}")


def _check_unique(path: Path, frame: pd.DataFrame, col: str) -> None:
    dup = frame[col].duplicated()
    if dup.any():
        raise DataFormatError(f"{path}: duplicate {col} {frame.loc[dup, col].iloc[0]!r}")
