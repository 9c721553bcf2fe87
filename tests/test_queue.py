"""The grid on DVC's experiment queue (cartlib/grid.py, scripts/queue_grid.py, docs/parallel.md).

Fast tests: `collect` on a toy DVC repository whose experiments run with `dvc exp run --temp` (the
temporary-workspace executor the queue uses). The slow test queues two ablation rows of the smoke
pipeline, runs them with two queue workers and checks them against the sequential run."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cartlib import grid
from cartlib.results import is_measurement_file
from pipeline_repo import BIN, _env, _run, tree_digest

ROOT = Path(__file__).resolve().parents[1]
GIT_ID = ["-c", "user.email=t@t", "-c", "user.name=t"]


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([str(BIN / "dvc"), *args], repo, check=check)


def lock_entry(repo: Path, stage: str, rev: str | None = None) -> dict:
    text = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout if rev else (repo / "dvc.lock").read_text()
    return yaml.safe_load(text)["stages"][stage]


def exp_rev(repo: Path, name: str) -> str:
    return grid.experiments(repo, [name])[name]


@pytest.fixture
def toy(tmp_path) -> Path:
    """A committed DVC repository with one foreach stage `rows` (a, b), reproduced."""
    repo = tmp_path / "toy"
    repo.mkdir()
    (repo / "params.yaml").write_text("# the rows\nrows:\n  a: 1  # first\n  b: 2\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"rows": {"foreach": "${rows}", "do": {
        "cmd": "mkdir -p out/${key} && echo ${item} > out/${key}/v.txt",
        "params": ["rows.${key}"], "outs": [{"out/${key}/v.txt": {"cache": False}}]}}}}))
    _run(["git", "init", "-q"], repo)
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    dvc(repo, "repro", "-q")
    _run(["git", "add", "-A"], repo)
    _run(["git", *GIT_ID, "commit", "-qm", "toy"], repo)
    return repo


def temp_exp(repo: Path, name: str, *args: str) -> None:
    dvc(repo, "exp", "run", "--temp", "-n", name, *args)


def clean(repo: Path) -> str:
    return _run(["git", "status", "--porcelain"], repo).stdout


def test_collect_brings_back_every_experiment_where_exp_apply_keeps_only_the_last(toy):
    temp_exp(toy, "x", "-S", "rows.a=10", "rows@a")
    temp_exp(toy, "y", "-S", "rows.b=20", "rows@b")
    # what DVC offers: `exp apply` writes one experiment's whole state, so the second undoes the first
    dvc(toy, "exp", "apply", "x")
    dvc(toy, "exp", "apply", "y")
    assert (toy / "out/a/v.txt").read_text() == "1\n" and (toy / "out/b/v.txt").read_text() == "20\n"
    _run(["git", "checkout", "-q", "--", "."], toy)
    assert clean(toy) == ""

    assert grid.main(["--root", str(toy), "collect"]) == 0
    assert (toy / "out/a/v.txt").read_text() == "10\n" and (toy / "out/b/v.txt").read_text() == "20\n"
    params = (toy / "params.yaml").read_text()
    assert yaml.safe_load(params) == {"rows": {"a": 10, "b": 20}}
    assert "# first" in params  # written the way DVC writes it: comments kept
    assert lock_entry(toy, "rows@a") == lock_entry(toy, "rows@a", exp_rev(toy, "x"))
    assert lock_entry(toy, "rows@b") == lock_entry(toy, "rows@b", exp_rev(toy, "y"))
    assert "up to date" in dvc(toy, "status").stdout
    # collecting again changes nothing
    before = {p: (toy / p).read_bytes() for p in ("dvc.lock", "params.yaml", "out/a/v.txt")}
    assert grid.main(["--root", str(toy), "collect"]) == 0
    assert before == {p: (toy / p).read_bytes() for p in before}


def test_collect_refuses_experiments_that_disagree_and_writes_nothing(toy):
    temp_exp(toy, "x", "-S", "rows.a=10", "rows@a")
    temp_exp(toy, "z", "-S", "rows.a=11", "rows@a")
    with pytest.raises(grid.CollectError, match="differently"):
        grid.collect(toy)
    assert clean(toy) == ""
    assert grid.collect(toy, ["z"]) == {"z": ["rows@a"]}  # named, one of them is fine
    assert (toy / "out/a/v.txt").read_text() == "11\n"


def test_collect_refuses_to_overwrite_a_workspace_change(toy):
    temp_exp(toy, "x", "-S", "rows.a=10", "rows@a")
    (toy / "out/a/v.txt").write_text("edited by hand\n")
    assert grid.main(["--root", str(toy), "collect"]) == 1
    assert (toy / "out/a/v.txt").read_text() == "edited by hand\n"
    assert clean(toy) == " M out/a/v.txt\n"


def test_queue_commands():
    assert grid.queue_commands(["image-full", "image-k_16"], force=True) == [
        ["exp", "run", "--queue", "-n", "image-full", "-f", "-s", "ablations@image-full"],
        ["exp", "run", "--queue", "-n", "image-k_16", "-f", "-s", "ablations@image-k_16"]]
    assert grid.queue_commands(["image-k_16"], sets=["base.seed=1"], prefix="s1-") == [
        ["exp", "run", "--queue", "-n", "s1-image-k_16", "-S", "base.seed=1", "ablations@image-k_16"]]
    with pytest.raises(SystemExit, match="cannot be combined"):
        grid.queue_commands(["full"], force=True, sets=["base.seed=1"])


def test_grid_rows_are_stage_items_on_every_task_of_the_grid(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ablations": {
        "tasks": ["image", "audio"], "rows": {"full": {}, "k_16": {"identifiers": {"n_clusters": 16}}}}}))
    assert grid.grid_rows(tmp_path) == ["image-full", "audio-full", "image-k_16", "audio-k_16"]
    assert grid.grid_rows(tmp_path, ["k_16", "audio-full"]) == ["image-k_16", "audio-k_16", "audio-full"]


def test_queue_grid_script_help():
    out = _run([str(BIN / "python"), "scripts/queue_grid.py", "--help"], ROOT).stdout
    assert all(cmd in out for cmd in ("queue", "start", "wait", "collect"))


def mlflow_runs(db: Path) -> list[tuple[str, str | None]]:
    """(run name, dvc_exp tag) of every run in the store, read straight from sqlite."""
    with sqlite3.connect(db) as con:
        return sorted(con.execute("select r.name, t.value from runs r left join tags t "
                                  "on t.run_uuid = r.run_uuid and t.key = 'dvc_exp'").fetchall(), key=str)


ROWS = ("full", "no_fusion")


@pytest.mark.slow
def test_the_grid_on_the_queue_with_two_workers_matches_the_sequential_run(smoke_repo, tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(smoke_repo), str(repo)], check=True)
    shutil.rmtree(repo / ".dvc" / "tmp", ignore_errors=True)
    # no cached variant models: the queue must really train both rows (the temporary workspaces
    # start without untracked files anyway; this also keeps the workspace from offering one)
    shutil.rmtree(repo / "models" / "image" / "variants", ignore_errors=True)
    _run(["git", "add", "-A"], repo)  # the sequential run is the commit the experiments start from
    _run(["git", *GIT_ID, "commit", "-qm", "sequential smoke run"], repo)
    rows = {r: f"results/ablations/image/{r}/" for r in ROWS}
    sequential = tree_digest(repo)
    assert {f"{d}metrics.json" for d in rows.values()} <= set(sequential)
    runs_before = mlflow_runs(repo / "mlflow.db")

    script = [str(BIN / "python"), str(ROOT / "scripts" / "queue_grid.py")]
    _run([*script, "queue", "--force", *ROWS], repo)  # each row on ablations.tasks: image
    start = time.time()
    proc = subprocess.run([*script, "start", "--jobs", "2", "--poll", "5"], cwd=repo, env=_env(),
                          capture_output=True, text=True, timeout=1800)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "Running: 2" in proc.stdout  # two workers, both experiments at once
    # report depends on the folder results/ablations, timings.json included: `--repro` reruns it
    proc = _run([*script, "collect", "--repro"], repo)
    assert "Data and pipelines are up to date." in proc.stdout, proc.stdout

    for row, folder in rows.items():
        timings = json.loads((repo / folder / "timings.json").read_text())
        assert timings["model_cache_hit"] in (False, 0), row  # trained in the queue, not loaded
        stage, name = f"ablations@image-{row}", f"image-{row}"
        assert lock_entry(repo, stage) == lock_entry(repo, stage, exp_rev(repo, name))
        # what came back is the experiment's: its timings.json (a measurement), not the commit's
        assert sequential[f"{folder}timings.json"] != tree_digest(repo)[f"{folder}timings.json"]
    after = tree_digest(repo)
    assert set(after) == set(sequential)
    different = sorted(p for p in after if after[p] != sequential[p])
    assert all(is_measurement_file(p) for p in different), different  # every result identical to the sequential run
    changed = {line[3:] for line in clean(repo).splitlines()}
    assert all(p == "dvc.lock" or is_measurement_file(p) for p in changed), changed
    # both runs went to the one store of the repository, tagged with their experiment
    new = [r for r in mlflow_runs(repo / "mlflow.db") if r not in runs_before]
    assert sorted(r for r in new if r[1]) == sorted((f"ablations/image/{r}", f"image-{r}") for r in ROWS)
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    print(f"queue of {len(ROWS)} rows with 2 workers: {elapsed:.0f} s")
