"""publish / publish_suite: measurements go to timings.json, never metrics.json; suite stages write results/<stage>/."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from cartlib import results, tracking
from cartlib.config import load_params
from cartlib.paths import task_paths

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def logged(monkeypatch):
    """Capture MLflow calls (the real store is slow to create and not what these tests are about)."""
    calls = []
    monkeypatch.setattr(tracking, "log_run", lambda **kw: calls.append(kw) or "run-id")
    return calls


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


@pytest.mark.parametrize("key", ["seconds", "fit_seconds", "train_seconds", "eval_seconds", "text_seconds",
                                 "embed_seconds", "gallery_build_seconds", "queries_per_second",
                                 "faiss_ivf_queries_per_second", "cart_decode_qps_largest", "model_cache_hit",
                                 "latency_ms_p50"])
def test_wall_clock_times_rates_and_cache_notes_are_measurements(key):
    assert results.is_measurement(key)


@pytest.mark.parametrize("key", ["recall_at_1", "mrr_at_10", "n_queries", "n_candidates", "collision_rate",
                                 "prefix_ratio_first_token", "val_recall_at_1", "final_loss", "recall_vs_exact"])
def test_results_are_not_measurements(key):
    assert not results.is_measurement(key)


def test_publish_routes_measurements_to_timings_json(tmp_path, params, logged):
    paths = task_paths(tmp_path, "image")
    results.publish(paths, "evaluate", params=params,
                    metrics={"recall_at_1": 0.5, "n_queries": 4, "seconds": 3.2, "queries_per_second": 9.1,
                             "model_cache_hit": True},
                    timings={"load_seconds": 0.4})
    out = tmp_path / "results" / "evaluate" / "image"
    assert json.loads((out / "metrics.json").read_text()) == {"n_queries": 4, "recall_at_1": 0.5}
    assert json.loads((out / "timings.json").read_text()) == {
        "seconds": 3.2, "queries_per_second": 9.1, "model_cache_hit": True, "load_seconds": 0.4}
    # MLflow still gets both
    assert {"recall_at_1", "seconds", "load_seconds"} <= set(logged[0]["metrics"])


def test_publish_splits_measurement_columns_out_of_tables(tmp_path, params, logged):
    history = pd.DataFrame({"epoch": [1, 2], "loss": [0.9, 0.7], "seconds": [12.5, 11.9]})
    results.publish(task_paths(tmp_path, "image"), "train", params=params, metrics={"final_loss": 0.7},
                    tables={"history": history}, variant=None)
    out = tmp_path / "results" / "train" / "image"
    assert list(pd.read_csv(out / "history.tsv", sep="\t").columns) == ["epoch", "loss"]
    assert pd.read_csv(out / "history.timings.tsv", sep="\t").to_dict("list") == {"epoch": [1, 2], "seconds": [12.5, 11.9]}
    assert not (out / "timings.json").exists()


def test_a_rerun_with_other_timings_rewrites_only_measurement_files(tmp_path, params, logged):
    def run(secs):
        results.publish(task_paths(tmp_path, "image"), "features", params=params,
                        metrics={"recall_at_1": 0.25, "train_seconds": secs},
                        tables={"history": pd.DataFrame({"epoch": [1], "seconds": [secs]})})
        return {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "results").rglob("*") if p.is_file()}

    first, second = run(1.0), run(2.0)
    changed = {p for p in first if first[p] != second[p]}
    assert changed == {"results/features/image/timings.json", "results/features/image/history.timings.tsv"}
    assert all(results.is_measurement_file(p) for p in changed)


def test_publish_suite_writes_under_results_stage_and_logs_one_run(tmp_path, params, logged):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    run_id = results.publish_suite(
        tmp_path, "throughput", params=params,
        metrics={"n_rows": 2, "cart_decode_qps_largest": 210.0},
        timings={"flatness_ratio": 1.1},
        tables={"summary": pd.DataFrame({"system": ["a"], "n": [1]})},
        csv_tables={"throughput": pd.DataFrame({"system": ["a"], "qps": [5.0]}),
                    "galleries": pd.DataFrame({"n_candidates": [10], "gallery_build_seconds": [0.2]})},
        figures={"throughput": fig})
    plt.close(fig)
    out = tmp_path / "results" / "throughput"
    assert run_id == "run-id"
    assert json.loads((out / "metrics.json").read_text()) == {"n_rows": 2}
    assert json.loads((out / "timings.json").read_text()) == {"cart_decode_qps_largest": 210.0, "flatness_ratio": 1.1}
    assert (out / "summary.tsv").exists()
    # throughput.csv is a measurement file: written whole; other tables lose their measurement columns
    assert list(pd.read_csv(out / "throughput.csv").columns) == ["system", "qps"]
    assert list(pd.read_csv(out / "galleries.csv").columns) == ["n_candidates"]
    assert (out / "galleries.timings.csv").exists()
    assert (out / "throughput.png").exists() and (out / "throughput.pdf").exists()
    [call] = logged
    assert call["stage"] == "throughput" and call["task"] is None and call["variant"] is None


def test_measurement_files_are_few_and_named():
    assert results.is_measurement_file("results/features/image/timings.json")
    assert results.is_measurement_file("results/ablations/image/full/timings.json")
    assert results.is_measurement_file("results/throughput/throughput.csv")
    assert results.is_measurement_file("results/tables/main.md")
    for stable in ("results/features/image/metrics.json", "results/evaluate/image/run.tsv",
                   "results/tables/ablations.md", "results/throughput/throughput_gpu.csv",
                   "results/data/image/samples.pdf"):
        assert not results.is_measurement_file(stable), stable


def test_report_main_table_reads_speeds_from_the_timings_publish_wrote(tmp_path, params, logged):
    """The main table's queries/s come from the evaluate stage's like-for-like speed table, whose rates
    publish routes into speed.timings.tsv (not from the stages' own queries/s)."""
    from cartlib import report

    task = params.base.tasks[0]
    paths = task_paths(tmp_path, task)
    scores = {"recall_at_1": 0.5, "recall_at_5": 0.6, "recall_at_10": 0.7, "mrr_at_10": 0.55, "n_queries": 4}
    results.publish(paths, "features", params=params, metrics={**scores, "train_seconds": 3.0})
    speed = pd.DataFrame({"system": ["cart", "dual_tower_exact", "faiss_flat"], "batch_size": [256] * 3,
                          "queries_per_second_with_encoding": [10.0, 300.0, 280.0],
                          "queries_per_second_without_encoding": [12.5, 900.0, 1200.0]})
    results.publish(paths, "evaluate", params=params, metrics={**scores, "queries_per_second": 7.0},
                    tables={"speed": speed})
    systems = pd.DataFrame({"system": ["dual_tower_exact", "faiss_flat"], "description": ["exact", "FAISS flat"],
                            "recall_at_1": [0.5, 0.5], "queries_per_second": [1.0, 2.0]})
    results.publish(paths, "baselines", params=params, metrics={}, tables={"systems": systems})
    assert "queries_per_second" not in (tmp_path / "results/evaluate" / task / "metrics.json").read_text()
    assert "queries_per_second" not in (tmp_path / "results/evaluate" / task / "speed.tsv").read_text()
    main = report.main_table(tmp_path, params).set_index("system")
    without, with_ = main["queries_per_second_without_encoding"], main["queries_per_second_with_encoding"]
    assert without["**CART** (main run)"] == 12.5 and with_["**CART** (main run)"] == 10.0
    assert without["dual-tower (our encoder), exact"] == 900.0 and with_["dual-tower (our encoder), exact"] == 300.0
    assert without["FAISS flat"] == 1200.0 and with_["FAISS flat"] == 280.0