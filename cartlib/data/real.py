"""Public captioned datasets from local files, written in the same schema as the built-in benchmark.

| dataset   | task  | annotations under `root`                               | media under `root`              |
|-----------|-------|--------------------------------------------------------|---------------------------------|
| flickr30k | image | `dataset_flickr30k.json` (Karpathy split)              | `images/<filename>`             |
| coco      | image | `dataset_coco.json` (Karpathy split)                   | `<filepath>/<filename>`         |
| audiocaps | audio | `train.csv`, `test.csv` (`val.csv` optional)           | `audio/<split>/<ytid>_<start>.wav` |
| clotho    | audio | `clotho_captions_{development,evaluation}.csv`         | `<split>/<file_name>`           |
| msrvtt    | video | `MSRVTT_data.json` + `MSRVTT_JSFUSION_test.csv` (1K-A) | `videos/<video_id>.mp4`         |
| msvd      | video | `AllVideoDescriptions.txt` + split lists or mapping    | `YouTubeClips/<clip_id>.avi`    |
| features  | any   | `items`, `captions` tables (.tsv + .npy, or .parquet)  | none: bring your own features   |

Every loader yields the same `RawItem`s; `build_real_dataset` resolves media paths, applies
`on_missing` to missing or unreadable files, and streams the kept items through
`schema.DatasetWriter` (no media.npy: `media_path` is relative to `root`). Each dataset's official
validation split becomes the schema's `val` split (Karpathy `val`, Clotho `validation`, AudioCaps
`val.csv`, MSVD 1201–1300 or `val_list.txt`, MSR-VTT's `validate` videos outside the 1K-A test
set): corpus items whose captions are the validation queries (qrels_val.tsv), never trained on.
Reference captions are the dataset's own captions (test ones are the queries, written to qrels;
a query's only relevant item is its own).
Pseudo-captions need a captioner's output: put it in `<root>/pseudo_captions.jsonl`, one line
`{"media": "<media path relative to root>", "captions": ["...", ...]}` per media file, and pass
`n_pseudo > 0`; without that file there are none, and the train stage stops before training
unless `train.caption_enhancement` is off (no test item would ever be a training target).

The exact layouts and where to get each dataset are in `docs/datasets.md`.
"""
from __future__ import annotations

import csv
import enum
import json
import math
import posixpath
import re
import wave
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Protocol, Sequence

import numpy as np
import pandas as pd

from cartlib.data import schema
from cartlib.data.features import save_features
from cartlib.data.schema import DataFormatError

TASK_OF = {"flickr30k": "image", "coco": "image", "audiocaps": "audio", "clotho": "audio",
           "msrvtt": "video", "msvd": "video", "features": None}
DATASETS = tuple(TASK_OF)
PSEUDO_FILE = "pseudo_captions.jsonl"
WRITE_CHUNK = 1000  # items per DatasetWriter.add call
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


class OnMissing(str, enum.Enum):
    """What to do with an item whose media file is missing or unreadable."""

    FAIL = "fail"  # raise, naming the file: a silently shrunken test gallery changes every metric
    SKIP = "skip"  # leave the item out and list it in the summary


class MediaError(DataFormatError):
    """A media file exists but cannot be decoded."""


class TaskFolder(Protocol):
    """What `build_real_dataset` needs from `cartlib.paths.TaskPaths` (any object with these)."""

    @property
    def dataset(self) -> Path: ...

    @property
    def qrels(self) -> Path: ...

    @property
    def qrels_val(self) -> Path: ...


class RawItem(NamedTuple):
    source_id: str  # the dataset's own id (file stem, video id, ...)
    split: str  # train | test | val | excluded (a split the schema has no place for)
    candidates: tuple[str, ...]  # media paths relative to root, the first that exists wins
    captions: list[str]  # reference captions, in file order
    source_file: Path  # the annotation file that names this item (for error messages)
    source_split: str  # the split's name in the dataset's own files
    pseudo: tuple[str, ...] = ()  # pseudo-captions given with the annotations (features tables only)


class RealDatasetSummary(NamedTuple):
    n_items: int  # items written (train + test + val)
    n_missing: int  # items whose media file does not exist
    missing: list[str]  # their expected paths, relative to root
    n_unreadable: int  # items whose media file exists but cannot be decoded
    unreadable: list[str]  # their paths, relative to root
    n_train: int = 0
    n_test: int = 0
    n_val: int = 0
    n_captions: int = 0  # reference captions written (test ones are the queries)
    n_pseudo: int = 0  # pseudo-captions written (from pseudo_captions.jsonl)
    n_excluded: int = 0  # items left out for another reason: an unknown split, no caption, max_items


class ImportedFeatures(NamedTuple):
    n_items: int
    n_captions: int
    dim: int
    n_unused: int  # rows in the source that match nothing in the dataset (e.g. a max_items subset)
    folder: Path


# ----------------------------------------------------------------------------- entry point

def build_real_dataset(*, dataset: str, root: str | Path, task_folder: TaskFolder,
                       on_missing: str | OnMissing = OnMissing.FAIL, max_items: int | None = None,
                       n_captions: int | None = None, n_pseudo: int = 0, verify_media: bool = True,
                       task: str | None = None, progress: bool = False) -> RealDatasetSummary:
    """Read `dataset` from `root`, write `task_folder.dataset`, `task_folder.qrels` and `.qrels_val`.

    `max_items` caps the written items, split between test, val and train in proportion to their sizes
    (first items in file order, so the subset is deterministic). `n_captions` caps the reference
    captions per item (None: all). `verify_media` opens every kept file's header (a truncated
    file that decodes partly is caught later, by the feature extractor, with its path).
    """
    name = _check_dataset(dataset)
    mode = _on_missing(on_missing)
    task = _task(name, task if task is not None else getattr(task_folder, "task", None))
    root = _check_root(root, name)
    if max_items is not None and max_items < 2:
        raise ValueError(f"max_items must be ≥ 2 (one test and one train item) or None, got {max_items}")
    if n_pseudo < 0:
        raise ValueError(f"n_pseudo must be ≥ 0, got {n_pseudo}")
    raws = LOADERS[name](root)
    used = [r for r in raws if r.split in schema.SPLITS and any(c.strip() for c in r.captions)]
    n_excluded = len(raws) - len(used)
    has_media = name != "features"  # a features dataset names no media to check
    kept, missing = _resolve(used, root=root, mode=mode) if has_media else (used, [])
    kept, n_cut = _subset(kept, max_items=max_items)  # before decoding headers: a subset checks fast
    kept, unreadable = _verify(kept, root=root, task=task, mode=mode, enabled=verify_media and has_media,
                               progress=progress)
    _check_nonempty(kept, root=root, name=name, n_missing=len(missing), n_unreadable=len(unreadable))
    pseudo = _pseudo_captions(root) if n_pseudo else {}
    counts = _write(kept, name=name, task=task, pseudo=pseudo, n_captions=n_captions, n_pseudo=n_pseudo,
                    task_folder=task_folder)
    return RealDatasetSummary(n_items=len(kept), n_missing=len(missing), missing=missing, n_unreadable=len(unreadable),
                              unreadable=unreadable, n_excluded=n_excluded + n_cut, **counts)


def _check_dataset(dataset: str) -> str:
    name = str(dataset).lower()
    if name not in TASK_OF:
        raise ValueError(f"data.dataset={dataset!r}: unknown real dataset; expected one of {list(DATASETS)}")
    return name


def _on_missing(value: str | OnMissing) -> OnMissing:
    try:
        return OnMissing(value)
    except ValueError:
        raise ValueError(f"on_missing={value!r}: expected one of {[m.value for m in OnMissing]}") from None


def _task(name: str, task: str | None) -> str:
    want = TASK_OF[name]
    if want is None:
        if task is None:
            raise ValueError("dataset 'features' has no fixed modality: pass task= (or a TaskPaths with .task)")
        return task
    if task is not None and task != want:
        raise ValueError(f"dataset {name!r} is a {want} dataset but the task is {task!r}; "
                         f"run it for the {want} task only (base.tasks=[{want}])")
    return want


def _check_root(root: str | Path, name: str) -> Path:
    if not str(root).strip():
        raise DataFormatError(f"data.root is empty: dataset {name!r} needs the folder it was unpacked in "
                              f"(see docs/datasets.md)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataFormatError(f"{root}: data.root is not a directory (dataset {name!r}; see docs/datasets.md)")
    return root.resolve()


# ----------------------------------------------------------------------------- selection

def _resolve(items: list[RawItem], *, root: Path, mode: OnMissing) -> tuple[list[RawItem], list[str]]:
    """Keep items whose media exists (candidates narrowed to the one found); list the others."""
    kept, missing, first_bad = [], [], None
    for item in items:
        found = next((c for c in item.candidates if (root / c).is_file()), None)
        if found is None:
            missing.append(item.candidates[0])
            first_bad = first_bad or item
        else:
            kept.append(item._replace(candidates=(found,)))
    if missing and mode is OnMissing.FAIL:
        tried = ", ".join(str(root / c) for c in first_bad.candidates)
        raise DataFormatError(
            f"{first_bad.source_file}: {len(missing)} of {len(items)} item(s) name a media file that does not "
            f"exist, e.g. {first_bad.source_id!r} (looked for {tried}); fix data.root or pass on_missing=skip "
            f"to leave them out")
    return kept, missing


def _subset(items: list[RawItem], *, max_items: int | None) -> tuple[list[RawItem], int]:
    """First items of each split, in proportion to the split sizes (test and train keep ≥ 1; val
    keeps its share, possibly none)."""
    if max_items is None or len(items) <= max_items:
        return items, 0
    n_test = sum(r.split == "test" for r in items)
    n_val = sum(r.split == "val" for r in items)
    n_train = len(items) - n_test - n_val
    keep_test = min(n_test, max(1, round(max_items * n_test / len(items)))) if n_test else 0
    keep_test = min(keep_test, max_items - 1) if n_train else keep_test  # and ≥ 1 train item
    keep_val = min(n_val, round(max_items * n_val / len(items)), max_items - keep_test - (1 if n_train else 0))
    quota = {"test": keep_test, "val": keep_val, "train": max_items - keep_test - keep_val}
    kept = []
    for item in items:
        if quota[item.split] > 0:
            kept.append(item)
            quota[item.split] -= 1
    return kept, len(items) - len(kept)


def _verify(items: list[RawItem], *, root: Path, task: str, mode: OnMissing, enabled: bool,
            progress: bool) -> tuple[list[RawItem], list[str]]:
    if not enabled:
        return items, []
    from tqdm.auto import tqdm

    kept, unreadable = [], []
    for item in tqdm(items, desc=f"check {task} files", unit="file", disable=not progress):
        path = root / item.candidates[0]
        try:
            check_media(path, task=task)
        except MediaError:
            if mode is OnMissing.FAIL:
                raise
            unreadable.append(item.candidates[0])
        else:
            kept.append(item)
    return kept, unreadable


def _check_nonempty(items: list[RawItem], *, root: Path, name: str, n_missing: int, n_unreadable: int) -> None:
    for split in ("train", "test"):  # a validation split is optional
        if not any(r.split == split for r in items):
            raise DataFormatError(f"{root}: dataset {name!r} has no {split} item left "
                                  f"({n_missing} missing and {n_unreadable} unreadable media file(s) skipped)")


# ----------------------------------------------------------------------------- writing

def _write(items: list[RawItem], *, name: str, task: str, pseudo: dict[str, list[str]], n_captions: int | None,
           n_pseudo: int, task_folder: TaskFolder) -> dict:
    items = [r for s in ("test", "train", "val") for r in items if r.split == s]  # schema: test first, val last
    ids = _unique_ids(items, name=name)
    media_paths = [r.candidates[0] if r.candidates else "" for r in items]
    captions = [[c for c in r.captions if c.strip()][:n_captions] for r in items]
    pseudos = [[c for c in (*r.pseudo, *pseudo.get(p, [])) if c.strip()][:n_pseudo] for r, p in zip(items, media_paths)]
    writer = schema.DatasetWriter(task_folder.dataset, task=task, dataset=name, n_items=len(items),
                                  media_shape=None, media_dtype=None)
    for lo in range(0, len(items), WRITE_CHUNK):
        hi = min(len(items), lo + WRITE_CHUNK)
        writer.add(item_ids=ids[lo:hi], splits=[r.split for r in items[lo:hi]],
                   attributes=[{"source_id": r.source_id, "source_split": r.source_split} for r in items[lo:hi]],
                   captions=captions[lo:hi], pseudo_captions=pseudos[lo:hi], media_paths=media_paths[lo:hi])
    writer.close(qrels_path=task_folder.qrels, qrels_val_path=task_folder.qrels_val)
    return {"n_train": writer.counts["train"], "n_test": writer.counts["test"], "n_val": writer.counts["val"],
            "n_captions": sum(map(len, captions)), "n_pseudo": sum(map(len, pseudos))}


def _unique_ids(items: Sequence[RawItem], *, name: str) -> list[str]:
    """`<dataset>-<source id>` made TSV- and trec_eval-safe; clashes get a `~k` suffix."""
    if name == "features":
        return [r.source_id for r in items]  # checked clean and unique on reading
    seen: Counter = Counter()
    out = []
    for r in items:
        base = f"{name}-{_UNSAFE_ID.sub('_', r.source_id).strip('_') or 'item'}"
        seen[base] += 1
        out.append(base if seen[base] == 1 else f"{base}~{seen[base]}")
    return out


def _pseudo_captions(root: Path) -> dict[str, list[str]]:
    """media path (relative to root) → captions, from `<root>/pseudo_captions.jsonl` if present."""
    path = root / PSEUDO_FILE
    if not path.is_file():
        return {}
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e})") from None
            caps = rec.get("captions") if isinstance(rec, dict) else None
            if not isinstance(rec, dict) or not isinstance(rec.get("media"), str) or not isinstance(caps, list):
                raise DataFormatError(f"{path}:{lineno}: expected {{\"media\": str, \"captions\": [str, ...]}}")
            out.setdefault(posixpath.normpath(rec["media"]), []).extend(str(c) for c in caps)
    return out


# ----------------------------------------------------------------------------- annotation readers

def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataFormatError(f"{path}: {what} not found (see docs/datasets.md for the expected layout)")
    return path


def _read_json(path: Path, what: str):
    _need(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: {what} is not valid JSON ({e})") from None


def _read_csv(path: Path, what: str, columns: Sequence[str]) -> list[dict]:
    _need(path, what)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataFormatError(f"{path}: {what} lacks column(s) {missing}; expected header with {list(columns)}")
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataFormatError(f"{path}: {what} cannot be parsed as UTF-8 CSV ({e})") from None


def _field(rec: dict, key: str, path: Path, where: str):
    if not isinstance(rec, dict) or key not in rec:
        raise DataFormatError(f"{path}: {where} lacks the field {key!r}")
    return rec[key]


def _karpathy(root: Path, *, name: str, file: str, extra_dirs: tuple[str, ...]) -> list[RawItem]:
    """Karpathy-split JSON: images[].{filename, filepath?, split, sentences[].raw}."""
    path = root / file
    data = _read_json(path, f"{name} caption file (Karpathy split)")
    images = _field(data, "images", path, "the top level")
    if not isinstance(images, list):
        raise DataFormatError(f"{path}: 'images' must be a list")
    split_of = {"train": "train", "restval": "train", "test": "test", "val": "val"}
    out = []
    for k, img in enumerate(images):
        where = f"images[{k}]"
        filename = str(_field(img, "filename", path, where))
        split = str(_field(img, "split", path, where))
        if split not in split_of:
            raise DataFormatError(f"{path}: {where} has split {split!r}; expected one of {list(split_of)}")
        sentences = _field(img, "sentences", path, where)
        caps = [str(s.get("raw") or " ".join(s.get("tokens", []))) for s in sentences if isinstance(s, dict)]
        sub = str(img.get("filepath") or "")
        cands = ((f"{sub}/{filename}", f"images/{sub}/{filename}") if sub else ()) + (f"images/{filename}",) + \
            tuple(f"{d}/{filename}" for d in extra_dirs)
        source_id = str(img.get("cocoid", "")) or Path(filename).stem
        out.append(RawItem(source_id, split_of[split], cands, caps, path, split))
    return out


def load_flickr30k(root: Path) -> list[RawItem]:
    """`dataset_flickr30k.json`; images in `images/` (or the tarball's `flickr30k-images/`)."""
    return _karpathy(root, name="flickr30k", file="dataset_flickr30k.json", extra_dirs=("flickr30k-images",))


def load_coco(root: Path) -> list[RawItem]:
    """`dataset_coco.json`; images in `<filepath>/` (train2014/, val2014/) or `images/<filepath>/`."""
    return _karpathy(root, name="coco", file="dataset_coco.json", extra_dirs=())


def load_audiocaps(root: Path) -> list[RawItem]:
    """`train.csv`, `test.csv` (+ optional `val.csv`): audiocap_id,youtube_id,start_time,caption.

    One item per (youtube_id, start_time); train has one caption per clip, val/test five.
    """
    split_of = {"train": "train", "val": "val", "test": "test"}
    out = []
    for split, target in split_of.items():
        path = root / f"{split}.csv"
        if split == "val" and not path.is_file():
            continue  # no validation queries then
        rows = _read_csv(path, f"AudioCaps {split} split file", ("audiocap_id", "youtube_id", "start_time", "caption"))
        clips: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
        for row in rows:
            clips.setdefault((row["youtube_id"], row["start_time"]), []).append(row["caption"])
        for (ytid, start), caps in clips.items():
            start_s = _plain_number(start)
            cands = tuple(f"audio/{split}/{stem}.wav" for stem in (f"{ytid}_{start_s}", f"Y{ytid}", ytid))
            out.append(RawItem(f"{ytid}_{start_s}", target, cands, caps, path, split))
    return out


def _plain_number(text: str) -> str:
    """'30.0' → '30' (the CSV's start times are whole seconds)."""
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def load_clotho(root: Path) -> list[RawItem]:
    """`clotho_captions_<split>.csv` (file_name, caption_1..caption_5); audio in `<split>/`."""
    split_of = {"development": "train", "validation": "val", "evaluation": "test"}
    columns = ("file_name",) + tuple(f"caption_{i}" for i in range(1, 6))
    out = []
    for split, target in split_of.items():
        path = root / f"clotho_captions_{split}.csv"
        if split == "validation" and not path.is_file():
            continue
        for row in _read_csv(path, f"Clotho {split} caption file", columns):
            name = row["file_name"]
            caps = [row[c] for c in columns[1:] if row.get(c)]
            cands = (f"{split}/{name}", f"audio/{split}/{name}")
            out.append(RawItem(Path(name).stem, target, cands, caps, path, split))
    return out


def load_msrvtt(root: Path) -> list[RawItem]:
    """The 1K-A protocol: test = the 1,000 videos of `MSRVTT_JSFUSION_test.csv`, one query each (its
    `sentence`); val = the videos whose own split is `validate` (497), train = every other video of
    `MSRVTT_data.json` (8,503 of the protocol's 9,000), each with all its captions."""
    data_path, test_path = root / "MSRVTT_data.json", root / "MSRVTT_JSFUSION_test.csv"
    data = _read_json(data_path, "MSR-VTT caption file")
    test_rows = _read_csv(test_path, "MSR-VTT 1K-A test split file", ("key", "vid_key", "video_id", "sentence"))
    videos = _field(data, "videos", data_path, "the top level")
    sentences = _field(data, "sentences", data_path, "the top level")
    caps: dict[str, list[str]] = {}
    for k, s in enumerate(sentences):
        caps.setdefault(str(_field(s, "video_id", data_path, f"sentences[{k}]")), []).append(
            str(_field(s, "caption", data_path, f"sentences[{k}]")))
    test_caps: OrderedDict[str, list[str]] = OrderedDict()
    for row in test_rows:
        test_caps.setdefault(row["video_id"], []).append(row["sentence"])
    out = [RawItem(vid, "test", _video_paths(vid), c, test_path, "1k-A test") for vid, c in test_caps.items()]
    for k, v in enumerate(videos):
        vid = str(_field(v, "video_id", data_path, f"videos[{k}]"))
        if vid not in test_caps:
            own = str(v.get("split", ""))
            out.append(RawItem(vid, "val" if own == "validate" else "train", _video_paths(vid), caps.get(vid, []),
                               data_path, own))
    return out


def _video_paths(vid: str) -> tuple[str, ...]:
    # MSRVTT.zip unpacks to MSRVTT/videos/all/; a plain videos/ folder is the documented layout
    return (f"videos/{vid}.mp4", f"videos/all/{vid}.mp4", f"MSRVTT/videos/all/{vid}.mp4")


MSVD_STANDARD = {"train": (1, 1200), "val": (1201, 1300), "test": (1301, 1970)}  # vidN ranges


def load_msvd(root: Path) -> list[RawItem]:
    """`AllVideoDescriptions.txt` (`<clip_id> <caption>` lines, `#` comments) and a split: either
    `train_list.txt` + `test_list.txt` (one clip id per line; `val_list.txt` optional), or the
    standard 1,200 / 100 / 670 split read from `youtube_mapping.txt` (`<clip_id> vid<N>`)."""
    cap_path = _need(root / "AllVideoDescriptions.txt", "MSVD caption file")
    caps: OrderedDict[str, list[str]] = OrderedDict()
    with open(cap_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            clip, _, text = line.partition(" ")
            if text.strip():
                caps.setdefault(clip, []).append(text.strip())
    split_of, split_file = _msvd_splits(root)
    out = []
    for clip, split in split_of.items():
        out.append(RawItem(clip, split, (f"YouTubeClips/{clip}.avi",), caps.get(clip, []), split_file, split))
    return out


def _msvd_splits(root: Path) -> tuple[dict[str, str], Path]:
    lists = {s: root / f"{s}_list.txt" for s in ("train", "val", "test")}
    mapping = root / "youtube_mapping.txt"
    if lists["train"].is_file() or lists["test"].is_file():
        out = {}
        for split, target in (("test", "test"), ("train", "train"), ("val", "val")):
            path = lists[split]
            if split == "val" and not path.is_file():
                continue
            for line in _need(path, f"MSVD {split} split list").read_text(encoding="utf-8").split():
                out.setdefault(line, target)
        return out, lists["test"]
    if not mapping.is_file():
        raise DataFormatError(f"{root}: MSVD split not found: expected train_list.txt + test_list.txt, or "
                              f"youtube_mapping.txt for the standard 1200/100/670 split (see docs/datasets.md)")
    out = {}
    for lineno, line in enumerate(mapping.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not re.fullmatch(r"vid\d+", parts[1]):
            raise DataFormatError(f"{mapping}:{lineno}: expected '<clip_id> vid<N>', got {line!r}")
        n = int(parts[1][3:])
        out[parts[0]] = next((s for s, (lo, hi) in MSVD_STANDARD.items() if lo <= n <= hi), "excluded")
    return out, mapping


def load_features_dataset(root: Path) -> list[RawItem]:
    """`items.{tsv,parquet}` (item_id, split[, media_path]) and `captions.{tsv,parquet}`
    (item_id, text[, kind]): a dataset for features extracted elsewhere (see `import_features`)."""
    items = read_table(root, "items", key_columns=("item_id", "split"), vectors=False).frame
    caps = read_table(root, "captions", key_columns=("item_id", "text"), vectors=False).frame
    items_file, caps_file = _table_path(root, "items"), _table_path(root, "captions")
    ids = items["item_id"]
    bad = ids.str.contains(r"\s", regex=True) | (ids == "")
    if bad.any():  # ids go into TSV and run files as they are: no renaming behind the user's back
        raise DataFormatError(f"{items_file}: item_id {ids[bad].iloc[0]!r} is empty or has whitespace")
    if ids.duplicated().any():
        raise DataFormatError(f"{items_file}: duplicate item_id {ids[ids.duplicated()].iloc[0]!r}")
    bad = ~items["split"].isin(("train", "test", "val", "validation"))
    if bad.any():
        raise DataFormatError(f"{items_file}: split {items.loc[bad, 'split'].iloc[0]!r}; expected train | test | val")
    kind = caps["kind"] if "kind" in caps else pd.Series("reference", index=caps.index)
    bad = ~kind.isin(schema.KINDS)
    if bad.any():
        raise DataFormatError(f"{caps_file}: kind {kind[bad].iloc[0]!r}; expected one of {list(schema.KINDS)}")
    unknown = set(caps["item_id"]) - set(ids)
    if unknown:
        raise DataFormatError(f"{caps_file}: caption(s) name unknown item_id, e.g. {sorted(unknown)[0]!r}")
    by_kind = {k: caps[kind == k].groupby("item_id", sort=False)["text"].apply(list).to_dict() for k in schema.KINDS}
    paths = items["media_path"] if "media_path" in items else pd.Series("", index=items.index)
    split_of = {"train": "train", "test": "test", "val": "val", "validation": "val"}
    return [RawItem(i, split_of[s], (m,) if m else (), by_kind["reference"].get(i, []),
                    items_file, s, tuple(by_kind["pseudo"].get(i, [])))
            for i, s, m in zip(ids, items["split"], paths)]


LOADERS: dict[str, Callable[[Path], list[RawItem]]] = {
    "flickr30k": load_flickr30k, "coco": load_coco, "audiocaps": load_audiocaps, "clotho": load_clotho,
    "msrvtt": load_msrvtt, "msvd": load_msvd, "features": load_features_dataset,
}


# ----------------------------------------------------------------------------- media files

def check_media(path: str | Path, *, task: str) -> None:
    """Raise `MediaError` naming `path` unless its header decodes (cheap: no full decode)."""
    path = Path(path)
    try:
        if task == "image":
            from PIL import Image

            with Image.open(path) as im:
                im.verify()
        elif task == "audio":
            if _audio_info(path) < 1:
                raise ValueError("no samples")
        elif task == "video":
            frames = _video_frames(path, wanted=None, limit=1)
            try:
                if next(frames, None) is None:
                    raise ValueError("no decodable frame")
            finally:
                frames.close()  # closes the container now, not at garbage collection
        else:
            raise ValueError(f"unknown task {task!r}")
    except MediaError:
        raise
    except Exception as e:  # each decoder raises its own types; the path is what the user needs
        raise MediaError(f"{path}: cannot be read as {_KIND_NAME.get(task, task)} ({type(e).__name__}: {e})") from None


_KIND_NAME = {"image": "an image", "audio": "a WAV file", "video": "a video"}


def load_image(path: str | Path):
    """A PIL RGB image (decoded now, so a truncated file fails here with its path)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise MediaError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None


def load_audio(path: str | Path, *, sampling_rate: int | None = None) -> np.ndarray:
    """(T,) float32 mono in [-1, 1], resampled to `sampling_rate` when given.

    soundfile when installed (any format it reads); else the stdlib `wave` (PCM) with
    scipy's reader as the fallback for float WAVs, which `wave` does not know.
    """
    try:
        audio, rate = _read_audio(Path(path))
    except Exception as e:
        raise MediaError(f"{path}: cannot be read as a WAV file ({type(e).__name__}: {e})") from None
    if audio.size == 0:
        raise MediaError(f"{path}: WAV file has no samples")
    if sampling_rate and rate != sampling_rate:
        audio = resample(audio, orig=rate, target=sampling_rate)
    return audio.astype(np.float32, copy=False)


def _read_audio(path: Path) -> tuple[np.ndarray, int]:
    try:
        import soundfile as sf
    except ImportError:
        sf = None
    if sf is not None:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        return data.mean(1), int(rate)
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
        return _pcm_to_float(raw, width=width).reshape(-1, channels).mean(1), rate
    except wave.Error:
        from scipy.io import wavfile  # float (IEEE) WAVs

        rate, data = wavfile.read(str(path))
        data = np.asarray(data)
        if data.dtype.kind in "iu":
            data = _int_to_float(data)
        return (data.reshape(len(data), -1).mean(1)).astype(np.float32), int(rate)


def _pcm_to_float(raw: bytes, *, width: int) -> np.ndarray:
    if width == 1:
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if width == 3:  # 24-bit little-endian: widen to int32, keep the sign
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.float32) / float(1 << 23)
    if width == 4:
        return np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    raise ValueError(f"unsupported sample width {width} bytes")


def _int_to_float(data: np.ndarray) -> np.ndarray:
    info = np.iinfo(data.dtype)
    if data.dtype.kind == "u":
        return (data.astype(np.float32) - (info.max + 1) / 2) / ((info.max + 1) / 2)
    return data.astype(np.float32) / float(-info.min)


def _audio_info(path: Path) -> int:
    """Number of frames, read from the header only."""
    try:
        import soundfile as sf

        return int(sf.info(str(path)).frames)
    except ImportError:
        pass
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes()
    except wave.Error:
        from scipy.io import wavfile

        _, data = wavfile.read(str(path), mmap=True)
        return len(data)


def resample(audio: np.ndarray, *, orig: int, target: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) from `orig` Hz to `target` Hz."""
    from scipy.signal import resample_poly

    g = math.gcd(int(orig), int(target))
    return resample_poly(audio.astype(np.float64), int(target) // g, int(orig) // g).astype(np.float32)


def load_video_frames(path: str | Path, *, n_frames: int) -> np.ndarray:
    """(n_frames, H, W, 3) uint8: the centre frame of each of `n_frames` equal segments.

    Frames are counted first (the container's count, else by demuxing packets: cheap, no
    decode), then one decoding pass keeps the wanted ones. A short clip repeats frames.
    """
    path = Path(path)
    try:
        total = _count_frames(path)
        centres = ((np.arange(n_frames) + 0.5) * total / n_frames).astype(int)
        wanted = Counter(np.minimum(centres, max(total - 1, 0)).tolist())
        frames = list(_video_frames(path, wanted=wanted, limit=None))
    except Exception as e:
        raise MediaError(f"{path}: cannot be read as a video ({type(e).__name__}: {e})") from None
    if not frames:
        raise MediaError(f"{path}: video has no decodable frame")
    while len(frames) < n_frames:  # the container over-reported its frame count
        frames.append(frames[-1])
    return np.stack(frames[:n_frames])


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for p in container.demux(stream) if p.size > 0)


def _video_frames(path: Path, *, wanted: Counter | None, limit: int | None) -> Iterable[np.ndarray]:
    """RGB frames whose index is in `wanted` (each as often as wanted), or the first `limit`."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        last = max(wanted) if wanted else None
        for index, frame in enumerate(container.decode(stream)):
            if wanted is None:
                yield frame.to_ndarray(format="rgb24")
                if limit is not None and index + 1 >= limit:
                    return
                continue
            for _ in range(wanted.get(index, 0)):
                yield frame.to_ndarray(format="rgb24")
            if index >= last:
                return


# ----------------------------------------------------------------------------- precomputed features

class Table(NamedTuple):
    frame: pd.DataFrame  # the id/metadata columns, as strings
    vectors: np.ndarray | None  # (rows, D) float32, row i = frame row i
    path: Path


def _table_path(folder: Path, name: str) -> Path:
    parquet = folder / f"{name}.parquet"
    return parquet if parquet.is_file() else folder / f"{name}.tsv"


def read_table(folder: str | Path, name: str, *, key_columns: Sequence[str] = (), vectors: bool = True) -> Table:
    """`<name>.parquet` (columns + an `embedding` list column) or `<name>.tsv` + `<name>.npy` (rows aligned)."""
    folder = Path(folder)
    path = _table_path(folder, name)
    if not path.is_file():
        raise DataFormatError(f"{folder}: expected {name}.parquet, or {name}.tsv + {name}.npy (see docs/datasets.md)")
    if path.suffix == ".parquet":
        frame, vecs = _read_parquet(path, vectors=vectors)
    else:
        try:
            frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
        except Exception as e:
            raise DataFormatError(f"{path}: cannot be parsed as TSV ({e})") from None
        vecs = _read_npy(folder / f"{name}.npy") if vectors else None
    missing = [c for c in key_columns if c not in frame.columns]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    if vecs is not None and len(vecs) != len(frame):
        raise DataFormatError(f"{path}: {len(frame)} rows but its vectors have {len(vecs)} rows")
    return Table(frame.astype(str), vecs, path)


def _read_parquet(path: Path, *, vectors: bool) -> tuple[pd.DataFrame, np.ndarray | None]:
    try:
        frame = pd.read_parquet(path)
    except Exception as e:
        raise DataFormatError(f"{path}: cannot be read as parquet ({e})") from None
    if vectors and "embedding" not in frame.columns:
        raise DataFormatError(f"{path}: no 'embedding' column (one list of floats per row)")
    vecs = None
    if vectors:
        try:
            vecs = np.stack([np.asarray(v, dtype=np.float32) for v in frame["embedding"]])
        except ValueError as e:
            raise DataFormatError(f"{path}: 'embedding' rows differ in length or are not numbers ({e})") from None
    return frame.drop(columns=["embedding"], errors="ignore"), vecs


def _read_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found (the vectors of {path.stem}.tsv, row for row)")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataFormatError(f"{path}: cannot be read as .npy ({e})") from None
    if arr.ndim != 2:
        raise DataFormatError(f"{path}: expected a (rows, dim) array, got shape {arr.shape}")
    return arr.astype(np.float32)


def import_features(*, source: str | Path, dataset_folder: str | Path, features_folder: str | Path,
                    meta: dict | None = None) -> ImportedFeatures:
    """Features from your own extractor (e.g. ImageBind) → `save_features` output for the dataset.

    `source` holds `items` and `captions` tables (see `read_table`). Item rows are matched by an
    `item_id` column, or by `media_path` (relative to data.root, as in items.tsv); caption rows by
    `caption_id`, or by (`item_id`, `text`). Every item and every reference caption of the dataset
    needs a vector; extra rows are ignored and counted. Vectors are L2-normalised to float32.
    """
    source = Path(source)
    if not source.is_dir():
        raise DataFormatError(f"{source}: features source is not a directory")
    ds = schema.load_dataset(dataset_folder)
    items = read_table(source, "items")
    caps = read_table(source, "captions")
    item_rows, unused_i = _match_items(items, ds)
    refs = ds.captions[ds.captions["kind"] == "reference"]
    cap_rows, unused_c = _match_captions(caps, refs)
    item_vecs, cap_vecs = items.vectors[item_rows], caps.vectors[cap_rows]
    if item_vecs.shape[1] != cap_vecs.shape[1]:
        raise DataFormatError(f"{items.path}: dimension {item_vecs.shape[1]} but {caps.path} has {cap_vecs.shape[1]}")
    info = {"text_model": f"precomputed ({caps.path.name})", "media_encoder": f"precomputed ({items.path.name})",
            "dataset_sha256": ds.manifest["sha256"], **(meta or {})}
    folder = save_features(features_folder, items=_unit(item_vecs, items.path),
                           caption_ids=refs["caption_id"].to_numpy(), captions=_unit(cap_vecs, caps.path), meta=info)
    return ImportedFeatures(len(item_rows), len(cap_rows), int(item_vecs.shape[1]), unused_i + unused_c, folder)


def _match_items(table: Table, ds: schema.Dataset) -> tuple[np.ndarray, int]:
    key = next((k for k in ("item_id", "media_path") if k in table.frame.columns), None)
    if key is None:
        raise DataFormatError(f"{table.path}: needs an 'item_id' or a 'media_path' column to match the dataset's items")
    values = table.frame[key] if key == "item_id" else table.frame[key].map(posixpath.normpath)
    want = ds.items[key] if key == "item_id" else ds.items[key].map(posixpath.normpath)
    return _rows_for(values, want, table.path, f"item ({key})")


def _match_captions(table: Table, refs: pd.DataFrame) -> tuple[np.ndarray, int]:
    cols = table.frame.columns
    if "caption_id" in cols:
        return _rows_for(table.frame["caption_id"], refs["caption_id"], table.path, "reference caption (caption_id)")
    if {"item_id", "text"} <= set(cols):
        # identical (item, text) pairs carry identical vectors, so the first row serves every copy
        have = table.frame["item_id"] + "\t" + table.frame["text"].map(schema._clean)
        want = refs["item_id"] + "\t" + refs["text"]
        return _rows_for(have, want, table.path, "reference caption (item_id, text)", allow_dup=True)
    raise DataFormatError(f"{table.path}: needs a 'caption_id' column, or 'item_id' + 'text', to match the captions")


def _rows_for(have: pd.Series, want: pd.Series, path: Path, what: str, *,
              allow_dup: bool = False) -> tuple[np.ndarray, int]:
    """Row of `have` for each value of `want` (in `want`'s order), and how many rows went unused."""
    if not allow_dup and have.duplicated().any():
        raise DataFormatError(f"{path}: duplicate {what} {have[have.duplicated()].iloc[0]!r}")
    row_of = pd.Series(np.arange(len(have)), index=have.to_numpy())
    row_of = row_of[~row_of.index.duplicated()]
    found = want.isin(row_of.index)
    if not found.all():
        first = want[~found].iloc[0].replace("\t", " | ")
        raise DataFormatError(f"{path}: no vector for {int((~found).sum())} {what}(s) of the dataset, e.g. {first!r}")
    rows = row_of[want.to_numpy()].to_numpy()
    return rows, int(len(have) - len(set(rows.tolist())))


def _unit(vectors: np.ndarray, path: Path) -> np.ndarray:
    if not np.isfinite(vectors).all():
        raise DataFormatError(f"{path}: vectors contain NaN or inf")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms == 0).any():
        raise DataFormatError(f"{path}: row {int((norms[:, 0] == 0).argmax())} is a zero vector")
    return (vectors / norms).astype(np.float32)
