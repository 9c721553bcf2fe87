"""MLflow tracking: experiment `cart` in one store per repository, shared by every stage process.

Which store (`tracking_uri`), first match wins:

1. ``MLFLOW_TRACKING_URI`` when set (MLflow's own variable): a store shared by several repositories,
   machines or queue workers (``sqlite:////abs/path/mlflow.db``, ``http://host:5000``, ...);
2. ``sqlite:///<repo>/mlflow.db`` of the repository. A stage that runs in a DVC temporary workspace
   (``<repo>/.dvc/tmp/exps/<tmp>/``, where ``dvc exp run --queue`` / ``--temp`` experiments run,
   deleted afterwards) logs to the store of ``<repo>``, the repository that queued it, never to a
   throw-away ``mlflow.db`` inside the temporary copy (`main_repository`).

Artifacts go beside a sqlite store (``<dir of mlflow.db>/mlruns``). Concurrent writers (queue workers,
``dvc queue start --jobs N``) are safe: on a sqlite store each `log_run` holds an exclusive
``flock`` on a per-store lock file (`LOCK_DIR_ENV`, default a per-user temp folder), so the first
process creates and migrates a new store alone and the others wait (a fresh store migrated by two
processes at once is left broken); every database call is retried with backoff when the database
is locked or busy (a reader such as ``mlflow ui``, another machine).

A tracking failure is a warning, never an error: the results on disk are what counts.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

EXPERIMENT = "cart"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
LOCK_DIR_ENV = "CART_LOCK_DIR"  # where the per-store lock files live (default: lock_dir())
DVC_TEMP_WORKSPACE = (".dvc", "tmp", "exps")  # <repo>/.dvc/tmp/exps/<tmp>: DVC's experiment executors
LOCK_TIMEOUT = 300.0  # seconds to wait for a store's lock before logging without it (with a warning)
RETRIES = 6  # attempts of one database call when the database is locked/busy
BACKOFF = 0.25  # seconds before the first retry; doubled each time, with jitter

T = TypeVar("T")


def main_repository(root: str | os.PathLike) -> Path:
    """``root``, or for a DVC temporary workspace ``<repo>/.dvc/tmp/exps/<tmp>[/...]`` the ``<repo>`` it belongs to."""
    root = Path(root).resolve()
    parts = root.parts
    n = len(DVC_TEMP_WORKSPACE)
    for i in range(len(parts) - n, 0, -1):
        if parts[i:i + n] == DVC_TEMP_WORKSPACE and len(parts) > i + n:
            return Path(*parts[:i])
    return root


def tracking_uri(root: str | os.PathLike) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<main repository of root>/mlflow.db``."""
    return os.environ.get(TRACKING_URI_ENV) or f"sqlite:///{main_repository(root) / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (absolute: ``sqlite:////abs``), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def artifact_location(uri: str) -> str | None:
    """``<dir of the sqlite file>/mlruns`` as a file URI; None (the server's default) for other stores."""
    path = sqlite_path(uri)
    return (path.parent / "mlruns").as_uri() if path else None


def lock_dir() -> Path:
    """``$CART_LOCK_DIR``, else ``<system temp>/cart-locks-<uid>``: one per user and machine."""
    env = os.environ.get(LOCK_DIR_ENV)
    path = Path(env) if env else Path(tempfile.gettempdir()) / f"cart-locks-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def store_lock(uri: str, *, timeout: float = LOCK_TIMEOUT, poll: float = 0.1) -> Iterator[bool]:
    """Hold an exclusive lock for the sqlite store of ``uri`` (no-op for other stores); yields whether
    it is held. After ``timeout`` seconds it yields False (with a warning) instead of waiting on."""
    path = sqlite_path(uri)
    if path is None:
        yield False
        return
    name = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    try:
        fh = open(lock_dir() / f"mlflow-{name}.lock", "a")
    except OSError as e:  # no lock folder (read-only temp): the retries alone protect the writes
        warnings.warn(f"no lock file for MLflow store {path} ({e}); logging without it", stacklevel=3)
        yield False
        return
    with fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    warnings.warn(f"MLflow store {path} stayed locked for {timeout:.0f} s; logging without the lock",
                                  stacklevel=3)
                    yield False
                    return
                time.sleep(poll)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: sqlite's "database is locked", "database table is locked", busy."""
    text = f"{exc.__class__.__name__}: {exc}".lower()
    return "locked" in text or "busy" in text


def retry(call: Callable[[], T], *, attempts: int = RETRIES, backoff: float = BACKOFF) -> T:
    """``call()``, retried with exponential backoff and jitter while it fails with `is_transient` errors."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as e:
            if attempt == attempts - 1 or not is_transient(e):
                raise
            time.sleep(backoff * 2 ** attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


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


def _experiment_id(client, uri: str) -> str:
    exp = retry(lambda: client.get_experiment_by_name(EXPERIMENT))
    if exp is not None:
        return exp.experiment_id
    try:
        return retry(lambda: client.create_experiment(EXPERIMENT, artifact_location=artifact_location(uri)))
    except Exception:  # created meanwhile by another process (a store without our lock: a server)
        exp = retry(lambda: client.get_experiment_by_name(EXPERIMENT))
        if exp is None:
            raise
        return exp.experiment_id


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def log_run(*, root: str | os.PathLike, stage: str, task: str | None, params: Mapping[str, Any],
            metrics: Mapping[str, float], artifacts: list[str | os.PathLike] = (), variant: str | None = None) -> str | None:
    """Log one stage run; returns the MLflow run id, or None (with a warning) if tracking failed.

    Run name `<stage>/<task>[/<variant>]`; a suite stage (task None) is named `<stage>` alone. Tags
    ``git_sha``, ``stage``, ``task``, ``variant``, and inside a DVC experiment ``dvc_exp`` (its name)
    and ``dvc_exp_baseline`` (the commit it was queued on).
    """
    name = "/".join(part for part in (stage, task, variant) if part)
    try:
        import logging

        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        root = Path(root).resolve()
        uri = tracking_uri(root)
        if (db := sqlite_path(uri)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        tags = {"git_sha": git_sha(root), "stage": stage, **({"task": task} if task else {})}
        if variant:
            tags["variant"] = variant
        for key, env in (("dvc_exp", "DVC_EXP_NAME"), ("dvc_exp_baseline", "DVC_EXP_BASELINE_REV")):
            if os.environ.get(env):
                tags[key] = os.environ[env]
        now = int(time.time() * 1000)
        with store_lock(uri):
            client = MlflowClient(tracking_uri=uri)  # creates (and migrates) a new store: under the lock
            experiment_id = _experiment_id(client, uri)
            run_id = retry(lambda: client.create_run(experiment_id, run_name=name, tags=tags)).info.run_id
            try:
                for chunk in _chunks([Param(k, str(v)[:500]) for k, v in params.items()], 100):
                    retry(lambda: client.log_batch(run_id, params=chunk))
                for chunk in _chunks([Metric(k, float(v), now, 0) for k, v in metrics.items()], 1000):
                    retry(lambda: client.log_batch(run_id, metrics=chunk))
                for path in artifacts:
                    if Path(path).exists():
                        client.log_artifact(run_id, str(path))
                retry(lambda: client.set_terminated(run_id))
            except Exception:
                with contextlib.suppress(Exception):
                    client.set_terminated(run_id, "FAILED")
                raise
            return run_id
    except Exception as e:  # tracking must never lose results on disk
        warnings.warn(f"MLflow tracking failed for {name}: {e.__class__.__name__}: {e}", stacklevel=2)
        return None
