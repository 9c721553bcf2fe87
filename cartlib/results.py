"""Write a stage's results (metrics.json, timings.json, run.tsv, tables, figures) and log them to MLflow.

Reruns are byte-stable: rerunning an unchanged stage rewrites nothing that is committed, except the
files in ``MEASUREMENT_FILES``. So what a stage *measured about the run* (wall-clock times, rates,
cache notes) never goes into ``metrics.json``; ``publish``/``publish_suite`` route it into
``timings.json`` beside it (and both go to MLflow). The rule, defined once in ``is_measurement``:
a key is a measurement when its name

- ends with ``seconds`` (``seconds``, ``fit_seconds``, ``train_seconds``, ``gallery_build_seconds``, ...),
- contains ``per_second`` (``queries_per_second``, ``matmul_flops_per_second``) or ``qps``,
- contains ``latency`` or ``peak_mem`` (timings and memory peaks of one run), or
- contains ``cache_hit`` (``model_cache_hit``: whether this run found a cached model).

Stage modules may keep passing such keys in ``metrics``; explicit ``timings=`` is accepted too.
Tables follow the same rule column by column: a table ``<name>`` with measurement columns (the
``seconds`` of each training epoch, the ``queries_per_second`` of each baseline) is written as
``<name>.tsv`` without them and ``<name>.timings.tsv`` holding them beside the table's label
columns (every column that is not a float: names, ids, epoch numbers), in the same row order.
Derived numbers whose names the rule cannot see (a ratio of two speeds) belong in ``timings=``.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Mapping, NamedTuple

import pandas as pd

from cartlib import io, tracking
from cartlib.config import Params
from cartlib.paths import TaskPaths

# The only committed files a rerun with nothing changed may rewrite; everything else is byte-stable.
# fnmatch patterns relative to the repository root (`*` also matches `/`); see `is_measurement_file`.
MEASUREMENT_FILES = (
    "results/*/timings.json",          # each stage's timings.json (routed by `is_measurement`)
    "results/*.timings.tsv",           # measurement columns of a stage's tables
    "results/*.timings.csv",
    "results/throughput/throughput.csv",  # the throughput measurements themselves, written whole
    "results/throughput/throughput.png",  # ... and their figure
    "results/throughput/throughput.pdf",
    "results/throughput/08_throughput.ipynb",  # executed notebooks that show those numbers
    "results/report/09_report.ipynb",
    "results/tables/main.md",          # the speed columns of the main table
    "results/tables/main.tex",
    "results/tables/claims.md",        # the throughput claim quotes measured speed ratios
    "results/REPORT.md",               # embeds both, and the MLflow run ids of this clone
)


def is_measurement_file(relpath: str | Path) -> bool:
    """True for a path (relative to the repository root) that a rerun may rewrite (`MEASUREMENT_FILES`)."""
    return any(fnmatch.fnmatchcase(Path(relpath).as_posix(), pat) for pat in MEASUREMENT_FILES)


_SUFFIXES = ("seconds",)
_PARTS = ("per_second", "qps", "latency", "peak_mem", "cache_hit")


def is_measurement(key: str) -> bool:
    """True for a key that describes this run (a time, a rate, a cache note), not the result."""
    k = key.lower()
    return k.endswith(_SUFFIXES) or any(p in k for p in _PARTS)


class Split(NamedTuple):
    metrics: dict  # the result: stable across reruns
    timings: dict  # the measurements of this run


def split_metrics(metrics: Mapping[str, object], timings: Mapping[str, object] | None = None) -> Split:
    """Route measurement keys of ``metrics`` (see ``is_measurement``) to timings, next to explicit ``timings``."""
    kept = {k: v for k, v in metrics.items() if not is_measurement(k)}
    moved = {k: v for k, v in metrics.items() if is_measurement(k)}
    return Split(kept, {**moved, **dict(timings or {})})


def split_table(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(the table without measurement columns, label columns + measurement columns or None if it has none)."""
    measured = [c for c in frame.columns if is_measurement(str(c))]
    if not measured:
        return frame, None
    labels = [c for c in frame.columns if c not in measured and frame[c].dtype.kind != "f"]
    return frame.drop(columns=measured), frame[labels + measured]


def publish(paths: TaskPaths, stage: str, *, params: Params, metrics: Mapping[str, float],
            timings: Mapping[str, float] | None = None, run: pd.DataFrame | None = None,
            tables: Mapping[str, pd.DataFrame] = {}, figures: Mapping[str, object] = {},
            variant: str | None = None) -> str | None:
    """Write everything under results/<stage>/<task>[/<variant>]/ and log an MLflow run; returns its id (or None)."""
    out = paths.results(stage) if variant is None else paths.results(stage) / variant
    written = _write(paths.root, out, metrics=metrics, timings=timings, run=run, tables=tables, figures=figures)
    return _log(root=paths.root, stage=stage, task=paths.task, params=params, written=written, variant=variant)


def publish_suite(root: str | Path, stage: str, *, params: Params, metrics: Mapping[str, float],
                  timings: Mapping[str, float] | None = None, tables: Mapping[str, pd.DataFrame] = {},
                  csv_tables: Mapping[str, pd.DataFrame] = {}, figures: Mapping[str, object] = {}) -> str | None:
    """The same for a stage that spans all tasks: everything under results/<stage>/, MLflow run `<stage>`."""
    root = Path(root).resolve()
    written = _write(root, root / "results" / stage, metrics=metrics, timings=timings, tables=tables,
                     csv_tables=csv_tables, figures=figures)
    return _log(root=root, stage=stage, task=None, params=params, written=written)


class _Written(NamedTuple):
    paths: list[Path]
    metrics: dict
    timings: dict


def _write(root: Path, out: Path, *, metrics, timings, run=None, tables={}, csv_tables={}, figures={}) -> _Written:
    split = split_metrics(metrics, timings)
    paths = [io.write_json(out / "metrics.json", split.metrics)]
    if split.timings:
        paths.append(io.write_json(out / "timings.json", split.timings))
    else:  # no stale timings from an earlier run beside fresh metrics
        (out / "timings.json").unlink(missing_ok=True)
    if run is not None:
        paths.append(io.write_dataframe_tsv(out / "run.tsv", run))
    for ext, write, frames in (("tsv", io.write_dataframe_tsv, tables), ("csv", io.write_dataframe_csv, csv_tables)):
        for name, frame in frames.items():
            path = out / f"{name}.{ext}"
            # a table that is itself a measurement (throughput.csv) is written whole
            stable, measured = (frame, None) if is_measurement_file(path.relative_to(root)) else split_table(frame)
            paths.append(write(path, stable))
            if measured is not None:
                paths.append(write(out / f"{name}.timings.{ext}", measured))
            else:
                (out / f"{name}.timings.{ext}").unlink(missing_ok=True)
    for name, fig in figures.items():
        paths.extend(io.save_figure(fig, out / name))
    return _Written(paths, split.metrics, split.timings)


def _log(*, root: Path, stage: str, task: str | None, params: Params, written: _Written,
         variant: str | None = None) -> str | None:
    flat = tracking.flatten("", {"base": params.base, stage: getattr(params, stage, {})})
    numbers = {k: v for k, v in {**written.metrics, **written.timings}.items() if isinstance(v, (int, float))}
    return tracking.log_run(root=root, stage=stage, task=task, params=flat, metrics=numbers,
                            artifacts=[p for p in written.paths if p.suffix in (".json", ".png", ".tsv", ".csv")],
                            variant=variant)
