"""File I/O for the suite: every write is atomic (temp file in the same folder, then rename).

With `io.py` and `tracking.py` the only modules that write files, a crash never leaves a
half-written file that looks complete: readers see either the old file or the new one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix last: tools that check extensions (papermill, savefig) see the right one
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_notebook(path: str | os.PathLike, nb: dict) -> Path:
    """Write a notebook (nbformat 4 dict) in nbformat's own on-disk layout, so diffs stay readable."""
    import nbformat

    return write_text(path, nbformat.writes(nbformat.from_dict(nb), version=4) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    return Path(path)


def write_dataframe_tsv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as a tab-separated file with a header and no index; gzip-compressed
    when ``path`` ends in ``.gz`` (the same frame gives the same bytes)."""
    with atomic_path(path) as tmp:
        if str(path).endswith(".gz"):  # no name, no time in the gzip header: byte-stable
            import gzip

            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
                out.write(frame.to_csv(sep="\t", index=False).encode())
        else:
            frame.to_csv(tmp, sep="\t", index=False)
    return Path(path)


def write_dataframe_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as a comma-separated file with a header and no index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` through a temp file, so an interrupted save never replaces a good checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def torch_load(path: str | os.PathLike, *, map_location: str = "cpu") -> Any:
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: cannot be read as a torch checkpoint ({e.__class__.__name__}: {e})") from None


# Run-independent file metadata, so saving the same figure twice gives the same bytes: no creation
# date in the PDF (matplotlib would stamp the current time); the PNG carries only a constant
# `Software` line (the matplotlib version), no time.
_FIGURE_METADATA = {"pdf": {"CreationDate": None, "ModDate": None}, "png": {}}


def save_figure(fig, stem: str | os.PathLike) -> list[Path]:
    """Save a matplotlib Figure as `<stem>.png` (reading) and `<stem>.pdf` (papers), byte-stable."""
    out = []
    for ext in ("png", "pdf"):
        path = Path(f"{stem}.{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight", metadata=_FIGURE_METADATA[ext])
        out.append(path)
    return out


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
