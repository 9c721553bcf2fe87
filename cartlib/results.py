"""Write a stage's results (metrics.json, run.tsv, tables, figures) and log them to MLflow."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from cartlib import io, tracking
from cartlib.config import Params
from cartlib.paths import TaskPaths


def publish(paths: TaskPaths, stage: str, *, params: Params, metrics: Mapping[str, float],
            run: pd.DataFrame | None = None, tables: Mapping[str, pd.DataFrame] = {},
            figures: Mapping[str, object] = {}, variant: str | None = None) -> str | None:
    """Write everything under results/<stage>/<task>/ and log an MLflow run; returns its id (or None)."""
    out = paths.results(stage) if variant is None else paths.results(stage) / variant
    written: list[Path] = [io.write_json(out / "metrics.json", dict(metrics))]
    if run is not None:
        written.append(io.write_dataframe_tsv(out / "run.tsv", run))
    for name, frame in tables.items():
        written.append(io.write_dataframe_tsv(out / f"{name}.tsv", frame))
    for name, fig in figures.items():
        written.extend(io.save_figure(fig, out / name))
    flat = {k: v for k, v in tracking.flatten("", {"base": params.base, stage: getattr(params, stage, {})}).items()}
    return tracking.log_run(root=paths.root, stage=stage, task=paths.task, params=flat,
                            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                            artifacts=[p for p in written if p.suffix in (".json", ".png", ".tsv")], variant=variant)
