"""On-disk identifier tables (written by the `identifiers` stage, read by training and evaluation).

```
data/<task>/identifiers/<scheme>.npz    codes (N, L) int64, row i = items.tsv row i; item_ids (N,)
data/<task>/identifiers/<scheme>.json   {"scheme", "vocabulary": {...}, "fingerprint", "has_unique_token",
                                         "config": {...}, "health": {...}}
```
The vocabulary and the fingerprint of the code table travel with the codes, so a model trained
against one table refuses to be evaluated against another.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cartlib import io
from cartlib.data.schema import DataFormatError
from cartlib.ids.vocab import Vocabulary


class IdentifierTable(NamedTuple):
    scheme: str
    codes: np.ndarray  # (N, L) int64
    item_ids: np.ndarray  # (N,) str
    vocab: Vocabulary
    fingerprint: str
    meta: dict


def save_identifiers(folder: str | os.PathLike, *, scheme: str, codes: np.ndarray, item_ids, level_sizes,
                     has_unique_token: bool, meta: dict) -> Path:
    folder = Path(folder)
    vocab = Vocabulary(level_sizes=tuple(int(s) for s in level_sizes))
    codes = vocab.check_codes(codes)
    with io.atomic_path(folder / f"{scheme}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, codes=codes, item_ids=np.asarray(item_ids, dtype=str))
    io.write_json(folder / f"{scheme}.json", {**meta, "scheme": scheme, "vocabulary": vocab.to_dict(),
                                               "fingerprint": vocab.fingerprint(codes),
                                               "has_unique_token": has_unique_token})
    return folder / f"{scheme}.npz"


def load_identifiers(folder: str | os.PathLike, scheme: str, *, item_ids=None) -> IdentifierTable:
    """Read one scheme's table; check codes against the vocabulary, the fingerprint and the items."""
    folder = Path(folder)
    path, meta_path = folder / f"{scheme}.npz", folder / f"{scheme}.json"
    for p in (path, meta_path):
        if not p.exists():
            raise DataFormatError(f"{p}: identifier table not found (run the `identifiers` stage with "
                                  f"'{scheme}' in identifiers.compare)")
    meta = io.read_json(meta_path)
    try:
        with np.load(path, allow_pickle=False) as z:
            codes, ids = z["codes"], z["item_ids"]
        vocab = Vocabulary.from_dict(meta["vocabulary"])
        vocab.verify(codes, meta["fingerprint"])
    except (ValueError, KeyError, OSError) as e:
        raise DataFormatError(f"{path}: {e}") from None
    if item_ids is not None and not np.array_equal(ids, np.asarray(item_ids, dtype=str)):
        raise DataFormatError(f"{path}: item ids differ from the dataset's items.tsv (stale identifiers?)")
    if len(np.unique(codes, axis=0)) != len(codes):
        raise DataFormatError(f"{path}: identifiers are not unique per item")
    return IdentifierTable(scheme, codes, ids, vocab, meta["fingerprint"], meta)
