"""MLflow tracking (cartlib/tracking.py): which store a stage logs to, and concurrent writers."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cartlib import tracking

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("CART_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def count_runs(db: Path) -> list[str]:
    """Run names in a store, read straight from sqlite (the oracle does not go through MLflow)."""
    with sqlite3.connect(db) as con:
        return sorted(name for (name,) in con.execute("select name from runs"))


def test_default_store_is_the_repository_root(tmp_path):
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.artifact_location(tracking.tracking_uri(tmp_path)) == (tmp_path.resolve() / "mlruns").as_uri()


@pytest.mark.parametrize("inside", [".dvc/tmp/exps/tmpab12cd", ".dvc/tmp/exps/tmpab12cd/sub/dir",
                                    ".dvc/tmp/exps/standalone/tmpab12cd"])
def test_a_dvc_temporary_workspace_logs_to_its_main_repository(tmp_path, inside):
    """Queued and --temp experiments run in <repo>/.dvc/tmp/exps/<tmp>, deleted afterwards."""
    assert tracking.main_repository(tmp_path / inside) == tmp_path.resolve()
    assert tracking.tracking_uri(tmp_path / inside) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.main_repository(tmp_path / ".dvc" / "tmp" / "exps") == tmp_path.resolve() / ".dvc/tmp/exps"


def test_mlflow_tracking_uri_wins(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared}")
    assert tracking.tracking_uri(tmp_path / "repo") == f"sqlite:///{shared}"
    assert tracking.sqlite_path(tracking.tracking_uri(tmp_path)) == shared
    assert tracking.artifact_location("http://127.0.0.1:5000") is None


def test_log_run_writes_to_the_store_named_by_the_environment(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared}")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "metrics.json").write_text("{}")
    run_id = tracking.log_run(root=repo, stage="evaluate", task="image", params={"base.seed": 0},
                              metrics={"recall_at_1": 0.5}, artifacts=[repo / "metrics.json"])
    assert run_id is not None
    assert count_runs(shared) == ["evaluate/image"]
    assert not (repo / "mlflow.db").exists()
    assert (tmp_path / "shared" / "mlruns").is_dir()  # artifacts beside the shared store, not in the repo
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{shared}").get_run(run_id)
    assert run.data.metrics == {"recall_at_1": 0.5} and run.data.params == {"base.seed": "0"}
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "evaluate"


def test_transient_errors_are_retried_others_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.retry(flaky, backoff=0.001) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        tracking.retry(lambda: (_ for _ in ()).throw(ValueError("bad value")), backoff=0.001)
    with pytest.raises(RuntimeError, match="locked"):
        tracking.retry(lambda: (_ for _ in ()).throw(RuntimeError("database is locked")), attempts=2, backoff=0.001)


def test_a_store_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/no/such/dir/mlflow.db")
    with pytest.warns(UserWarning, match="MLflow tracking failed for train/image"):
        assert tracking.log_run(root=tmp_path, stage="train", task="image", params={}, metrics={}) is None


WRITER = """
import sys, time
from cartlib import tracking
import mlflow  # the import (seconds) happens before the start signal, so the writes overlap
root, who, n, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
time.sleep(max(0.0, t0 - time.time()))
ids = [tracking.log_run(root=root, stage="ablations", task="image", variant=f"{who}-{i}", params={"i": i},
                        metrics={"recall_at_1": i / 10}) for i in range(n)]
print(sum(i is not None for i in ids))
"""


def test_concurrent_writers_on_a_new_sqlite_store_record_every_run(tmp_path):
    """Four queue workers logging at once to a store none of them has created yet: without the store
    lock they migrate it concurrently, fail ("table alembic_version already exists", ...) and lose runs."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "CART_LOCK_DIR": str(tmp_path / "locks")}
    start = time.time() + 8  # after every process has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(repo), f"w{k}", "3", str(start)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    out = [p.communicate(timeout=300) for p in procs]
    assert [o.strip() for o, _ in out] == ["3"] * 4, [e[-2000:] for _, e in out]
    assert count_runs(repo / "mlflow.db") == sorted(f"ablations/image/w{k}-{i}" for k in range(4) for i in range(3))


def test_the_store_lock_is_exclusive_and_a_stuck_holder_only_delays(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.store_lock(uri) as held:
        assert held
        with pytest.warns(UserWarning, match="stayed locked"):
            with tracking.store_lock(uri, timeout=0.2) as second:
                assert not second  # logs anyway after the timeout, without the lock
    with tracking.store_lock(uri) as again:
        assert again  # released
    with tracking.store_lock("http://127.0.0.1:5000") as server:
        assert not server  # a server serialises its own writes
