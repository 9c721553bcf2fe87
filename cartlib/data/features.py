"""On-disk item and caption features (written by the `features` stage, read by later stages).

```
data/<task>/features/
    items.npy        (N, D) float32, L2-normalised, row i = items.tsv row i
    captions.npy     (Q, D) float32, L2-normalised, row j = caption_ids.tsv row j
    caption_ids.tsv  caption_id        (every reference caption of the dataset)
    manifest.json    {"dim", "n_items", "n_captions", "text_model", "media_encoder", "dataset_sha256"}
```
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cartlib import io
from cartlib.data.schema import DataFormatError, Dataset


class Features(NamedTuple):
    item_ids: np.ndarray  # (N,) str
    items: np.ndarray  # (N, D) float32
    caption_ids: np.ndarray  # (Q,) str
    captions: np.ndarray  # (Q, D) float32
    meta: dict


def save_features(folder: str | os.PathLike, *, items: np.ndarray, caption_ids, captions: np.ndarray, meta: dict) -> Path:
    """Write the feature folder under a temporary name, then rename it into place."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _check_matrix(items, "items", None)
    _check_matrix(captions, "captions", items.shape[1])
    io.write_npy(tmp / "items.npy", items.astype(np.float32))
    io.write_npy(tmp / "captions.npy", captions.astype(np.float32))
    io.write_dataframe_tsv(tmp / "caption_ids.tsv", pd.DataFrame({"caption_id": list(caption_ids)}))
    io.write_json(tmp / "manifest.json", {**meta, "dim": int(items.shape[1]), "n_items": int(len(items)),
                                          "n_captions": int(len(captions))})
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_features(folder: str | os.PathLike, dataset: Dataset, *, dim: int | None = None) -> Features:
    """Read and validate features against their dataset (row counts, dimension, finiteness)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: features folder not found (run the `features` stage first)")
    meta = io.read_json(folder / "manifest.json")
    items = _load(folder / "items.npy")
    captions = _load(folder / "captions.npy")
    cap_ids = pd.read_csv(folder / "caption_ids.tsv", sep="\t", dtype=str, keep_default_na=False)["caption_id"].to_numpy()
    if len(items) != len(dataset.items):
        raise DataFormatError(f"{folder / 'items.npy'}: {len(items)} rows but the dataset has {len(dataset.items)} items")
    if len(captions) != len(cap_ids):
        raise DataFormatError(f"{folder / 'captions.npy'}: {len(captions)} rows but caption_ids.tsv lists {len(cap_ids)}")
    want = dim if dim is not None else meta.get("dim")
    for name, arr in (("items.npy", items), ("captions.npy", captions)):
        _check_matrix(arr, str(folder / name), want)
    unknown = ~np.isin(cap_ids, dataset.captions["caption_id"].to_numpy())
    if unknown.any():
        raise DataFormatError(f"{folder / 'caption_ids.tsv'}: caption_id {cap_ids[unknown][0]!r} is not in the dataset")
    return Features(dataset.items["item_id"].to_numpy(), items, cap_ids, captions, meta)


def _load(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataFormatError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataFormatError(f"{path}: cannot be read as .npy ({e})") from None


def _check_matrix(arr: np.ndarray, name: str, dim: int | None) -> None:
    if arr.ndim != 2:
        raise DataFormatError(f"{name}: expected a 2-D (rows, dim) array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise DataFormatError(f"{name}: feature dimension {arr.shape[1]}, expected {dim}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(1).argmax())
        raise DataFormatError(f"{name}: contains NaN or inf (first at row {bad})")
