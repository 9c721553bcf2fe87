"""Integration: the DVC pipeline at smoke scale, in a temporary copy of the repository.

The pipeline runs exactly as a newcomer runs it (tests/pipeline_repo.py; the session fixture
`smoke_repo` in conftest.py).
"""
import json
import shutil

import pandas as pd
import pytest
import yaml

from cartlib.metrics import metrics_from_run
from cartlib.results import is_measurement_file
from pipeline_repo import BIN, ROOT, _run, make_reproduce, tree_digest

METRIC_KEYS = {"recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "n_queries", "n_candidates"}


@pytest.mark.slow
def test_pipeline_outputs_follow_the_contract(smoke_repo):
    for task in ("image", "audio", "video"):
        out = smoke_repo / "results" / "features" / task
        m = json.loads((out / "metrics.json").read_text())
        assert METRIC_KEYS <= set(m)
        assert 0.0 <= m["recall_at_1"] <= m["recall_at_5"] <= m["recall_at_10"] <= 1.0
        run = pd.read_csv(out / "run.tsv", sep="\t", dtype={"query_id": str, "item_id": str})
        assert list(run.columns) == ["query_id", "rank", "item_id", "score"]
        qrels = pd.read_csv(smoke_repo / "data" / task / "qrels.tsv", sep="\t", dtype=str)
        assert list(qrels.columns) == ["query_id", "item_id"]
        recomputed = metrics_from_run(run, qrels, n_candidates=m["n_candidates"])
        for key in ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "n_queries"):
            assert recomputed[key] == pytest.approx(m[key], abs=1e-9), key
        assert (out / "02_features.ipynb").exists() and (out / "training_curve.png").exists()
        assert (smoke_repo / "results" / "data" / task / "samples.png").exists()
    assert (smoke_repo / "mlflow.db").exists()


@pytest.mark.slow
def test_identifier_health_is_reported(smoke_repo):
    for task in ("image", "audio", "video"):
        out = smoke_repo / "results" / "identifiers" / task
        m = json.loads((out / "metrics.json").read_text())
        assert {"collision_rate", "max_items_per_prefix", "unique_token_p99", "code_usage_l0", "perplexity_l0",
                "reconstruction_rel_error"} <= set(m)
        assert "fit_seconds" in json.loads((out / "timings.json").read_text())  # a measurement, not a result
        schemes = pd.read_csv(out / "schemes.tsv", sep="\t")
        assert set(schemes["scheme"]) == {"cart", "atomic", "hierarchical_kmeans", "rqvae_only", "kmeans_unique", "random"}
        assert (schemes.loc[schemes["scheme"] == "atomic", "collision_rate"] == 0).all()


@pytest.mark.slow
def test_cart_is_trained_and_evaluated_by_the_pipeline(smoke_repo):
    for task in ("image", "audio", "video"):
        out = smoke_repo / "results" / "evaluate" / task
        m = json.loads((out / "metrics.json").read_text())
        assert METRIC_KEYS <= set(m) and m["n_candidates"] == 100
        run = pd.read_csv(out / "run.tsv", sep="\t", dtype={"query_id": str, "item_id": str})
        qrels = pd.read_csv(smoke_repo / "data" / task / "qrels.tsv", sep="\t", dtype=str)
        assert metrics_from_run(run, qrels)["recall_at_10"] == pytest.approx(m["recall_at_10"])
        items = pd.read_csv(smoke_repo / "data" / task / "dataset" / "items.tsv", sep="\t", dtype=str)
        assert set(run["item_id"]) <= set(items.loc[items["split"] == "test", "item_id"])  # only valid identifiers
        errors = pd.read_csv(out / "errors.tsv", sep="\t")
        assert errors["misses"].sum() == round((1 - m["recall_at_1"]) * m["n_queries"])
        assert (smoke_repo / "results" / "train" / task / "training_curve.png").exists()


@pytest.mark.slow
def test_suite_stages_write_tables_figures_and_report(smoke_repo):
    res = smoke_repo / "results"
    systems = pd.read_csv(res / "baselines" / "image" / "systems.tsv", sep="\t").set_index("system")
    assert systems.loc["faiss_flat", "recall_vs_exact"] == 1.0
    dual = json.loads((res / "features" / "image" / "metrics.json").read_text())
    assert systems.loc["dual_tower_exact", "recall_at_1"] == pytest.approx(dual["recall_at_1"])
    rows = {r: json.loads((res / "ablations" / "image" / r / "metrics.json").read_text())
            for r in ("full", "no_fusion", "k_16", "beam_5")}
    assert all(m["n_queries"] == 500 for m in rows.values())  # grid.n_queries: 0 = every smoke test query
    assert rows["beam_5"]["beam"] == 5
    # beam_5 differs from full in evaluation only: the same model (full's seed 0), trained once
    assert json.loads((res / "ablations" / "image" / "beam_5" / "timings.json").read_text())["model_cache_hit"]
    seeds = pd.read_csv(res / "ablations" / "image" / "full" / "seeds" / "seeds.tsv", sep="\t").set_index("seed")
    assert seeds.loc[0, "model_key"] == rows["beam_5"]["model_key"]
    # every row trains on the grid's schedule (smoke: grid.train epochs 2, patience 1) with validation
    assert (seeds["train_epochs"] <= 2).all() and (seeds["best_epoch"] <= seeds["train_epochs"]).all()
    for _, s in seeds.iterrows():  # each seed's validation curve: one value per epoch, its best at best_epoch
        curve = [float(v) for v in str(s["val_recall_at_1_per_epoch"]).split()]
        assert len(curve) == s["train_epochs"] and curve.index(max(curve)) + 1 == s["best_epoch"]
    assert rows["no_fusion"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["k_16"]["level_sizes"].startswith("16×")
    assert (res / "tsne" / "image" / "tsne_prefixes.png").exists()
    report = (res / "REPORT.md").read_text()
    assert "## Claims" in report and "CART beats the dual-tower baseline" in report
    assert "## What the evidence shows" in report and "Where CART loses" in report
    assert "### Did the models converge?" in report
    assert (res / "tables" / "main.md").exists() and (res / "tables" / "ablations.tex").exists()
    assert "Identifier schemes in the same model" in report and (res / "tables" / "schemes.md").exists()
    assert (res / "tables" / "learning_curves.png").exists()
    table = pd.read_csv(res / "throughput" / "throughput.csv")
    assert list(table.columns) == ["system", "device", "n_candidates", "batch_size", "beam", "qps", "latency_ms_p50",
                                   "peak_mem_mb", "recall_vs_exact"]
    assert {"cart_end_to_end", "cart_decode", "unconstrained_decode", "dual_tower_exact", "faiss_flat"} <= set(table["system"])
    assert set(table["n_candidates"]) == {100, 1000}
    assert (table.loc[table["system"] == "faiss_flat", "recall_vs_exact"].dropna() == 1.0).all()
    assert (res / "throughput" / "throughput.png").exists()


@pytest.mark.slow
def test_pipeline_is_up_to_date_after_repro(smoke_repo):
    proc = _run([str(BIN / "dvc"), "status"], smoke_repo)
    assert "up to date" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_every_result_file_is_a_declared_output(smoke_repo):
    """What a stage writes under results/ is in dvc.yaml's outs, so DVC knows it (and `dvc status` tells)."""
    lock = yaml.safe_load((smoke_repo / "dvc.lock").read_text())["stages"]
    outs = {o["path"] for stage in lock.values() for o in stage.get("outs", [])}
    inputs = {o["path"] for stage in lock.values() for o in stage.get("deps", [])}  # throughput_gpu.csv
    undeclared = sorted(f for f in tree_digest(smoke_repo)
                        if f not in inputs and not any(f == d or f.startswith(d.rstrip("/") + "/") for d in outs))
    assert not undeclared, f"written but not declared in dvc.yaml: {undeclared}"


# one instance of every stage: its rerun on an unchanged tree may rewrite only measurement files
RERUN = ("data@image", "features@image", "identifiers@image", "train@image", "evaluate@image", "baselines@image",
         "ablations@image-full", "ablations@image-beam_5", "tsne", "throughput", "report")


@pytest.mark.slow
def test_rerunning_every_stage_rewrites_only_measurement_files(smoke_repo):
    before = tree_digest(smoke_repo)
    for stage in RERUN:
        proc = make_reproduce(smoke_repo, "-f", "-s", stage)
        assert proc.returncode == 0, f"{stage}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
    after = tree_digest(smoke_repo)
    assert set(after) == set(before), f"files appeared/vanished: {sorted(set(after) ^ set(before))}"
    changed = sorted(p for p in before if before[p] != after[p] and not is_measurement_file(p))
    assert not changed, f"a rerun with nothing changed rewrote {changed}"


def test_cli_rejects_unknown_param_key_before_work(tmp_path):
    (tmp_path / "params.yaml").write_text("base:\n  seed: 0\ndata:\n  n_trian: 3\n")
    proc = _run([str(BIN / "cart-stage"), "data", "--task", "image", "--root", str(tmp_path)], tmp_path, check=False)
    assert proc.returncode == 2 and "n_trian" in proc.stderr


def test_cli_rejects_unknown_task(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = _run([str(BIN / "cart-stage"), "data", "--task", "smell", "--root", str(tmp_path)], tmp_path, check=False)
    assert proc.returncode == 2 and "'smell'" in proc.stderr


@pytest.mark.slow
def test_seeded_ablation_rows_average_their_seeds(smoke_repo):
    """full and no_fusion are seeded rows (smoke: seeds 0 and 1): metrics.json is the mean of the
    seeds' runs, recomputed here from each run file and the qrels (the oracle)."""
    qrels = pd.read_csv(smoke_repo / "data" / "image" / "qrels.tsv", sep="\t", dtype=str)
    for row, n_seeds in (("full", 2), ("no_fusion", 2), ("k_16", 1)):
        out = smoke_repo / "results" / "ablations" / "image" / row
        m = json.loads((out / "metrics.json").read_text())
        runs = [out / "run.tsv", *sorted((out / "seeds").glob("seed_*/run.tsv"))]
        assert m["n_seeds"] == n_seeds == len(runs)
        r1 = []
        for path in runs:  # each run scores the rows' common queries (grid.n_queries)
            run = pd.read_csv(path, sep="\t", dtype={"query_id": str, "item_id": str})
            r1.append(metrics_from_run(run, qrels[qrels["query_id"].isin(set(run["query_id"]))])["recall_at_1"])
        assert m["recall_at_1"] == pytest.approx(sum(r1) / len(r1))
        seeds = pd.read_csv(out / "seeds" / "seeds.tsv", sep="\t")
        assert seeds["seed"].tolist() == list(range(n_seeds)) and seeds["model_key"].nunique() == n_seeds
