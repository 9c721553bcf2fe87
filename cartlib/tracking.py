"""MLflow tracking: one sqlite store at the repository root, experiment `cart`.

A tracking failure is a warning, never an error: the results on disk are what counts.
"""
from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Mapping

EXPERIMENT = "cart"


def tracking_uri(root: str | os.PathLike) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def git_sha(root: str | os.PathLike) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def flatten(prefix: str, obj: Any) -> dict[str, Any]:
    """Nested dataclass/dict → {"section.key": value} for mlflow params."""
    import dataclasses
    import enum

    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    if isinstance(obj, enum.Enum):
        obj = obj.value
    return {prefix: obj}


def log_run(*, root: str | os.PathLike, stage: str, task: str | None, params: Mapping[str, Any],
            metrics: Mapping[str, float], artifacts: list[str | os.PathLike] = (), variant: str | None = None) -> str | None:
    """Log one stage run; returns the MLflow run id, or None (with a warning) if tracking failed.

    Run name `<stage>/<task>[/<variant>]`; a suite stage (task None) is named `<stage>` alone.
    """
    name = "/".join(part for part in (stage, task, variant) if part)
    try:
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        root = Path(root).resolve()
        mlflow.set_tracking_uri(tracking_uri(root))
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            mlflow.create_experiment(EXPERIMENT, artifact_location=(root / "mlruns").as_uri())
        mlflow.set_experiment(EXPERIMENT)
        tags = {"git_sha": git_sha(root), "stage": stage, **({"task": task} if task else {})}
        if variant:
            tags["variant"] = variant
        with mlflow.start_run(run_name=name, tags=tags) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            for path in artifacts:
                if Path(path).exists():
                    mlflow.log_artifact(str(path))
            return run.info.run_id
    except Exception as e:  # tracking must never lose results on disk
        warnings.warn(f"MLflow tracking failed for {name}: {e.__class__.__name__}: {e}", stacklevel=2)
        return None
