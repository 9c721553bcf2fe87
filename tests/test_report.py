"""The report stage's evidence: per-query runs (one per seed), paired intervals, verdicts, short lists, provenance."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cartlib import report, stats
from cartlib.config import params_from_dict

REPO = Path(__file__).resolve().parents[1]
N = 1000


def _params(**rows_of):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["base"]["tasks"] = ["image"]
    rows = rows_of.get("rows", ("full", "no_fusion", "no_rqvae", "no_kmeans", "no_consistency",
                                "no_caption_enhancement", "atomic"))
    raw["ablations"]["rows"] = {r: raw["ablations"]["rows"][r] for r in rows}
    return params_from_dict(raw)


def hits(*bounds: int, n: int = N) -> np.ndarray:
    """0/1 per query: 1 on [a, b) for each pair of bounds."""
    return np.isin(np.arange(n), np.concatenate([np.arange(a, b) for a, b in zip(bounds[::2], bounds[1::2])]))


def write_row(root: Path, folder: str, row_hits: np.ndarray, *, name: str = "run.tsv", depth: int = 10,
              metrics: dict | None = None) -> None:
    """A run whose rank-1 item is the relevant one exactly where ``row_hits`` (then ``depth - 1`` fillers)."""
    d = root / "results" / folder
    n = len(row_hits)
    rows = [(f"q{i}", r, (f"i{i}" if h else "wrong") if r == 1 else f"filler{r}", -float(r))
            for i, h in enumerate(row_hits) for r in range(1, depth + 1)]
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["query_id", "rank", "item_id", "score"]).to_csv(path, sep="\t", index=False)
    if name == "run.tsv" and "seed_" not in folder:
        r1 = float(np.mean(row_hits))
        (d / "metrics.json").write_text(json.dumps(metrics or {"recall_at_1": r1, "recall_at_10": r1,
                                                              "mrr_at_10": r1, "n_candidates": 1000}))
    qrels = root / "data" / "image" / "qrels.tsv"
    if not qrels.exists():
        qrels.parent.mkdir(parents=True)
        pd.DataFrame({"query_id": [f"q{i}" for i in range(n)], "item_id": [f"i{i}" for i in range(n)]}).to_csv(
            qrels, sep="\t", index=False)


def ablations(root: Path, **row_hits) -> None:
    for row, h in row_hits.items():
        write_row(root, f"ablations/image/{row}", h)


def claim(claims: pd.DataFrame, text: str) -> pd.Series:
    rows = claims[claims["claim"].str.contains(text, regex=False)]
    assert len(rows) == 1, (text, list(claims["claim"]))
    return rows.iloc[0]


# ------------------------------------------------------------------------------------ per-query runs
def test_hits_at_1_by_hand(tmp_path):
    qrels = pd.DataFrame({"query_id": ["a", "b", "c", "d", "c"], "item_id": ["x", "y", "z", "w", "z2"]})
    run = pd.DataFrame({"query_id": ["a", "a", "b", "c"], "rank": [1, 2, 1, 1], "item_id": ["x", "y", "q", "z2"],
                        "score": [0.0] * 4})
    run.to_csv(tmp_path / "run.tsv", sep="\t", index=False)
    assert report.hits_at_1(tmp_path / "run.tsv", qrels).to_dict() == {"a": 1.0, "b": 0.0, "c": 1.0}  # d: not run


def test_a_row_is_its_run_plus_one_run_per_extra_seed(tmp_path):
    d = tmp_path / "row"
    for rel in ("run.tsv", "seed_1/run.tsv", "seed_12/run.tsv", "seed_x/run.tsv", "seed_3/other.tsv"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("")
    assert report.seed_runs(d, "run.tsv", 0) == {0: d / "run.tsv", 1: d / "seed_1/run.tsv", 12: d / "seed_12/run.tsv"}
    assert report.seed_runs(d, "run.tsv", 1) == {1: d / "seed_1/run.tsv", 12: d / "seed_12/run.tsv"}  # same seed
    assert report.seed_runs(tmp_path / "none", "run.tsv", 0) == {}


# ------------------------------------------------------------------------------------------- claims
@pytest.mark.parametrize("fusion_hits, verdict", [
    ((0, 100), "holds"),                # 100 hits against the runner-up's 300: a clear lead
    ((0, 250, 350, 395), "inconclusive"),  # 295 hits, but 95 queries differ from the runner-up's: noise
])
def test_fusion_matters_most_needs_its_gap_to_the_runner_up_to_exclude_zero(tmp_path, fusion_hits, verdict):
    ablations(tmp_path, full=hits(0, 400), no_fusion=hits(*fusion_hits), no_rqvae=hits(0, 300),
              no_kmeans=hits(0, 380), no_consistency=hits(0, 395), no_caption_enhancement=hits(0, 50))
    params = _params()
    claims = report.claims_table(tmp_path, params, pd.DataFrame(), report.ablation_table(tmp_path, params))
    fusion = claim(claims, "Fusion matters most")
    assert fusion["verdict"] == verdict and fusion["kind"] == "gaps > 0"
    assert "w/o caption enhancement 0.050 (-0.350)" in fusion["ours"]  # larger, but not one of the paper's rows
    assert fusion["delta"] == pytest.approx(0.3 - np.mean(hits(*fusion_hits)))  # the gap to w/o RQ-VAE
    assert (fusion["ci_low"] > 0) == (verdict == "holds")
    assert fusion["paper_delta"] == pytest.approx((76.22 - 75.54) / 100)


def test_the_issues_examples_are_inconclusive_and_atomic_gets_an_interval(tmp_path):
    """'RQ-VAE next' with a gap of +0.007 ± 0.014 and 'consistency adds little' with Δ −0.008 whose
    interval allows −2.6 pt were reported as holding; both are inconclusive."""
    # the committed numbers, on 1,000 queries: full 123 hits, w/o fusion 25, w/o RQ-VAE 32, ...
    ablations(tmp_path, full=hits(0, 123), no_fusion=hits(0, 25), no_rqvae=hits(0, 20, 100, 112),
              no_kmeans=hits(0, 105), no_consistency=hits(0, 100, 200, 215), no_caption_enhancement=hits(0, 1))
    write_row(tmp_path, "ablations/image/atomic", hits(0, 2, 500, 503))  # the grid's atomic row vs its full row
    params = _params()
    claims = report.claims_table(tmp_path, params, pd.DataFrame(), report.ablation_table(tmp_path, params))
    rq = claim(claims, "RQ-VAE matters next")
    assert rq["delta"] == pytest.approx(0.007) and rq["ci_low"] < 0 < rq["ci_high"]
    assert rq["verdict"] == "inconclusive"
    cons = claim(claims, "consistency loss adds little")
    assert cons["delta"] == pytest.approx(-0.008) and cons["ci_low"] < -0.01
    assert cons["verdict"] == "inconclusive" and cons["kind"] == "|Δ| ≤ 0.01"
    kmeans = claim(claims, "K-Means coarse token helps")
    assert kmeans["rel_delta"] == pytest.approx(-0.018 / 0.123)
    assert kmeans["paper_rel_delta"] == pytest.approx((79.50 - 81.78) / 81.78)  # relative beside absolute
    atomic = claim(claims, "beat atomic identifiers")
    assert atomic["delta"] == pytest.approx(0.118) and atomic["ci_low"] > 0 and atomic["verdict"] == "holds"
    assert atomic["n_queries"] == N and atomic["n_seeds"] == "1 / 1"
    assert claim(claims, "Caption enhancement helps")["verdict"] == "holds"


def test_cart_against_the_dual_tower_and_the_pseudo_caption_baseline_are_paired(tmp_path):
    write_row(tmp_path, "evaluate/image", hits(0, 440))
    write_row(tmp_path, "features/image", hits(0, 300))
    params = _params(rows=("full",))
    missing = report.claims_table(tmp_path, params, pd.DataFrame(), pd.DataFrame())
    assert claim(missing, "pseudo-caption matching")["verdict"] == "not measured"
    write_row(tmp_path, "baselines/image", hits(0, 430, 900, 915), name="runs/pseudo_caption_fused.tsv.gz")
    claims = report.claims_table(tmp_path, params, pd.DataFrame(), pd.DataFrame())
    dual = claim(claims, "CART beats the dual-tower baseline")
    assert dual["delta"] == pytest.approx(0.14) and dual["verdict"] == "holds"
    assert dual["paper_delta"] == pytest.approx(0.069) and dual["paper_rel_delta"] == pytest.approx(6.9 / 74.9)
    fused = claim(claims, "pseudo-caption matching")
    assert fused["delta"] == pytest.approx(-0.005) and fused["verdict"] == "inconclusive"
    assert "runs/pseudo_caption_fused.tsv.gz" in fused["evidence"]


def test_several_seeds_widen_the_interval_and_are_counted(tmp_path):
    write_row(tmp_path, "evaluate/image", hits(0, 440))
    write_row(tmp_path, "features/image", hits(0, 400))
    params = _params(rows=("full",))
    one = claim(report.claims_table(tmp_path, params, pd.DataFrame(), pd.DataFrame()), "dual-tower baseline")
    write_row(tmp_path, "evaluate/image/seed_1", hits(0, 380), name="run.tsv")
    write_row(tmp_path, "evaluate/image/seed_2", hits(0, 500), name="run.tsv")
    three = claim(report.claims_table(tmp_path, params, pd.DataFrame(), pd.DataFrame()), "dual-tower baseline")
    assert three["n_seeds"] == "3 / 1" and one["n_seeds"] == "1 / 1"
    assert three["delta"] == pytest.approx((0.44 + 0.38 + 0.5) / 3 - 0.4)
    assert three["ci_high"] - three["ci_low"] > 1.5 * (one["ci_high"] - one["ci_low"])


# ----------------------------------------------------------------------------------- ablation table
def test_ablation_rows_with_short_lists_show_no_recall_at_10(tmp_path):
    ablations(tmp_path, full=hits(0, 123))
    write_row(tmp_path, "ablations/image/beam_1", hits(0, 102), depth=1,
              metrics={"recall_at_1": 0.102, "recall_at_10": 0.102, "mrr_at_10": 0.102, "n_candidates": 1000})
    write_row(tmp_path, "ablations/image/beam_5", hits(0, 129), depth=5,  # written by the new metrics: null
              metrics={"recall_at_1": 0.129, "recall_at_10": None, "mrr_at_10": None, "n_candidates": 1000})
    params = _params(rows=("full", "beam_1", "beam_5"))
    abl = report.ablation_table(tmp_path, params).set_index("row")
    for row in ("beam_1", "beam_5"):
        assert np.isnan(abl.loc[row, "recall_at_10"]) and np.isnan(abl.loc[row, "mrr_at_10"])
        assert np.isnan(abl.loc[row, "delta_recall_at_10"])
    assert abl.loc["beam_1", "recall_at_1"] == pytest.approx(0.102)
    assert abl.loc["beam_1", "delta_r1_ci95_low"] < -0.021 < abl.loc["beam_1", "delta_r1_ci95_high"]
    assert abl.loc["full", "recall_at_10"] == pytest.approx(0.123) and abl.loc["beam_5", "n_seeds"] == 1
    assert abl.loc["beam_5", "rel_delta_recall_at_1"] == pytest.approx(0.006 / 0.123)
    shown = report._fmt(abl.reset_index()).to_markdown(index=False)
    beam_1 = next(line for line in shown.splitlines() if line.startswith("| beam_1"))
    assert "nan" not in shown and "None" not in shown and "||" in beam_1.replace(" ", "")  # empty cells


# --------------------------------------------------------------------------------------- provenance
def _lock(evaluate_md5: str, report_md5: str) -> str:
    return yaml.safe_dump({"schema": "2.0", "stages": {
        "evaluate@image": {"cmd": "x", "deps": [{"path": "cartlib/x.py", "hash": "md5", "md5": evaluate_md5}],
                           "params": {"params.yaml": {"base.seed": 0}}},
        "report": {"cmd": "y", "deps": [{"path": "results/evaluate", "hash": "md5", "md5": report_md5}]}}})


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_provenance_names_the_commit_that_recorded_the_stage_inputs_not_head(tmp_path):
    assert report.provenance(tmp_path).note.startswith("no dvc.lock")
    (tmp_path / "dvc.lock").write_text(_lock("a", "r1"))
    assert report.provenance(tmp_path).commit is None  # no git history here
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "dvc.lock")
    _git(tmp_path, "commit", "-qm", "old results")
    (tmp_path / "dvc.lock").write_text(_lock("b", "r1"))
    _git(tmp_path, "commit", "-qam", "results")
    produced = _git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "dvc.lock").write_text(_lock("b", "r2"))  # only the report's own entry changes
    _git(tmp_path, "commit", "-qam", "report rerun")
    (tmp_path / "other.txt").write_text("x")
    _git(tmp_path, "add", "other.txt")
    _git(tmp_path, "commit", "-qm", "unrelated")
    prov = report.provenance(tmp_path)
    assert prov.commit == produced != _git(tmp_path, "rev-parse", "HEAD") and prov.n_stages == 1
    same_inputs = report._inputs_hash(_lock("b", "another report entry"))[0]
    assert prov.inputs_sha256 == same_inputs != report._inputs_hash(_lock("a", ""))[0]
    (tmp_path / "dvc.lock").write_text(_lock("c", "r2"))  # rerun, not committed yet
    prov = report.provenance(tmp_path)
    assert prov.commit is None and "not in a commit yet" in prov.note


# ------------------------------------------------------------------------------------------- render
def test_the_report_renders_the_claims_with_intervals_and_names_the_method(tmp_path):
    ablations(tmp_path, full=hits(0, 400), no_fusion=hits(0, 100), no_rqvae=hits(0, 300), no_kmeans=hits(0, 380),
              no_consistency=hits(0, 398), no_caption_enhancement=hits(0, 50))
    write_row(tmp_path, "evaluate/image", hits(0, 440))
    write_row(tmp_path, "features/image", hits(0, 300))
    result = report.run(_params(), tmp_path)
    md = re.sub(" +", " ", (tmp_path / "results" / "REPORT.md").read_text())  # cells unpadded
    assert stats.METHOD in md and "Provenance: " in md and "no dvc.lock" in md
    assert "| CART beats the dual-tower baseline (R@1) | image | 0.440 vs 0.300 | Δ > 0 | +0.140 | [+0." in md
    assert "+46.7%" in md and "1000; 1 / 1" in md
    assert set(result.claims["verdict"]) <= {"holds", "refuted", "inconclusive", "not measured"}
    assert claim(result.claims, "consistency loss adds little")["verdict"] == "holds"  # −0.002, tight
    again = tmp_path / "again.md"
    again.write_text((tmp_path / "results" / "tables" / "ablations.md").read_text())
    report.run(_params(), tmp_path)  # the ablation table is byte-stable (not a measurement file)
    assert (tmp_path / "results" / "tables" / "ablations.md").read_text() == again.read_text()


def test_provenance_reads_the_mlflow_store_the_stages_log_to(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI (a shared store, docs/parallel.md) is where the run ids are, not <root>/mlflow.db."""
    from cartlib.report import _mlflow_runs
    from cartlib.tracking import log_run

    store = tmp_path / "shared" / "mlflow.db"
    store.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    repo = tmp_path / "repo"
    repo.mkdir()
    run_id = log_run(root=repo, stage="train", task="image", params={"a": 1}, metrics={"m": 1.0})
    assert run_id and not (repo / "mlflow.db").exists()
    runs = _mlflow_runs(repo)
    assert runs.set_index("run").loc["train/image", "run_id"] == run_id


def test_seed_runs_finds_the_ablation_stages_seeds_folder(tmp_path):
    from cartlib.report import seed_runs

    row = tmp_path / "row"
    for rel in ("run.tsv", "seeds/seed_1/run.tsv", "seeds/seed_2/run.tsv", "seed_3/run.tsv", "seeds/seeds.tsv"):
        (row / rel).parent.mkdir(parents=True, exist_ok=True)
        (row / rel).write_text("query_id\trank\titem_id\tscore\n")
    found = seed_runs(row, "run.tsv", 0)
    assert found == {0: row / "run.tsv", 1: row / "seeds/seed_1/run.tsv", 2: row / "seeds/seed_2/run.tsv",
                     3: row / "seed_3/run.tsv"}


def test_the_summary_names_every_verdict_and_where_cart_loses():
    claims = pd.DataFrame([
        {"claim": "CART beats the dual-tower baseline (R@1)", "task": "image", "delta": 0.1, "ci_low": 0.08,
         "ci_high": 0.12, "verdict": "holds"},
        {"claim": "CART beats the dual-tower baseline (R@1)", "task": "audio", "delta": -0.05, "ci_low": -0.07,
         "ci_high": -0.03, "verdict": "refuted"},
        {"claim": "The K-Means coarse token helps", "task": "image", "delta": -0.001, "ci_low": -0.02,
         "ci_high": 0.02, "verdict": "inconclusive"},
    ])
    main = pd.DataFrame([
        {"task": "image", "system": "dual-tower (our encoder), exact", "recall_at_1": 0.3,
         "queries_per_second_with_encoding": 900.0},
        {"task": "image", "system": report.CART_ROW, "recall_at_1": 0.5, "queries_per_second_with_encoding": 1000.0},
        {"task": "audio", "system": "dual-tower (our encoder), exact", "recall_at_1": 0.6,
         "queries_per_second_with_encoding": 900.0},
        {"task": "audio", "system": report.CART_ROW, "recall_at_1": 0.55, "queries_per_second_with_encoding": 100.0},
    ])
    text = report.evidence_summary(claims, main)
    assert "3 claims checked: 1 holds, 1 refuted, 1 inconclusive, 0 not measured." in text
    assert "- **refuted**: CART beats the dual-tower baseline (R@1) (audio, Δ -0.050 [-0.070, -0.030])." in text
    assert "- **inconclusive**: The K-Means coarse token helps (image, Δ -0.001 [-0.020, +0.020])." in text
    assert "- audio: R@1 of CART 0.550 is below dual-tower (our encoder), exact (0.600)." in text
    assert "- audio: CART answers 100 queries/s" in text and "(the slowest, dual-tower (our encoder), exact: 900)" in text
    assert "image: R@1" not in text and "image: CART answers" not in text  # image: CART best and fastest
    assert "nowhere" in report.evidence_summary(claims, main[main["task"] == "image"])


def test_convergence_counts_each_grid_model_once_and_flags_a_best_last_epoch(tmp_path):
    params = _params(rows=("full", "no_fusion", "beam_1"))
    last = int(params.grid.train.get("epochs", params.train.epochs))
    patience = int(params.grid.train.get("patience", params.train.patience))
    assert last >= 9 and patience == 2  # the hand-made epochs below assume it
    (tmp_path / "results" / "train" / "image").mkdir(parents=True)
    (tmp_path / "results" / "train" / "image" / "metrics.json").write_text(json.dumps(
        {"best_epoch": 7, "epochs_trained": 8, "val_recall_at_1": 0.588}))
    # model "a" is shared by full and beam_1 (counted once) and peaks at the last allowed epoch; "b" one epoch
    # before the schedule's end (near), "c" stopped early by the patience, "d" two epochs before the end
    for row, keys, trained, best in (("full", ("a", "b"), (last, last), (last, last - 1)),
                                     ("beam_1", ("a",), (last,), (last,)),
                                     ("no_fusion", ("c", "d"), (9, last), (7, last - 2))):
        d = tmp_path / "results" / "ablations" / "image" / row / "seeds"
        d.mkdir(parents=True)
        pd.DataFrame({"seed": range(len(keys)), "model_key": keys, "train_epochs": trained,
                      "best_epoch": best}).to_csv(d / "seeds.tsv", sep="\t", index=False)
    g = report.grid_convergence(tmp_path, params)
    assert g.n_models == 4 and g.budget_limited == 1
    assert g.not_plateaued == [f"full seed 0 (best epoch {last} of {last})",
                               f"full seed 1 (best epoch {last - 1} of {last})"]
    text = report.convergence_summary(tmp_path, params)
    assert f"- Main model, image: best epoch 7 of 8 (at most {params.train.epochs}; validation R@1 0.588)" in text
    assert (f"- The grid (at most {last} epochs, patience 2): 2 of its 4 trainings reached a plateau (1 stopped early "
            "by the patience, 1 with no better validation R@1 in the last 2 epochs of the schedule, 0 levelled off: "
            "their last 2 epochs raised it by at most 0.005); 1 had their best validation R@1 at their last allowed "
            "epoch") in text
    assert "budget-limited, not converged" in text and "1 ended fewer than 2 epochs after their best" in text
    assert f"Not at a proven plateau: full seed 0 (best epoch {last} of {last}); full seed 1" in text
    # every model at a plateau: no flag
    for row in ("full", "beam_1"):
        (tmp_path / "results" / "ablations" / "image" / row / "seeds" / "seeds.tsv").unlink()
    text = report.convergence_summary(tmp_path, params)
    assert "2 of its 2 trainings reached a plateau" in text and "budget-limited" not in text
    assert "Not at a proven plateau" not in text


def test_a_grid_training_whose_curve_levelled_off_counts_as_a_plateau(tmp_path):
    params = _params(rows=("full",))
    last = int(params.grid.train.get("epochs", params.train.epochs))
    rising = [0.1 + 0.03 * i for i in range(last)]  # +0.06 in its last 2 epochs
    flat = rising[:-2] + [rising[-3] + 0.002, rising[-3] + 0.004]  # +0.004: levelled off
    d = tmp_path / "results" / "ablations" / "image" / "full" / "seeds"
    d.mkdir(parents=True)
    pd.DataFrame({"seed": [0, 1], "model_key": ["a", "b"], "train_epochs": [last, last], "best_epoch": [last, last],
                  "val_recall_at_1_per_epoch": [" ".join(f"{v:.4f}" for v in c) for c in (rising, flat)]}
                 ).to_csv(d / "seeds.tsv", sep="\t", index=False)
    g = report.grid_convergence(tmp_path, params)
    assert g.budget_limited == 1 and g.not_plateaued == [f"full seed 0 (best epoch {last} of {last})"]
    assert "1 of its 2 trainings reached a plateau (0 stopped early by the patience, 0 with no better validation " \
           "R@1 in the last 2 epochs of the schedule, 1 levelled off" in report.convergence_summary(tmp_path, params)


def test_a_main_model_whose_curve_levelled_off_is_said_so():
    m = {"best_epoch": 8, "epochs_trained": 8, "val_recall_at_1": 0.6}
    text = report._main_convergence("image", m, 8, 2, [0.1, 0.3, 0.4, 0.5, 0.55, 0.597, 0.598, 0.6])
    assert "raised validation R@1 by 0.0030, at most 0.005: levelled off" in text
    assert "not converged" in report._main_convergence("image", m, 8, 2, [0.1, 0.3, 0.4, 0.5, 0.55, 0.57, 0.58, 0.6])


def test_a_main_model_best_at_its_last_allowed_epoch_is_not_converged():
    state = lambda best, trained: report._main_convergence("audio", {"best_epoch": best, "epochs_trained": trained,
                                                                     "val_recall_at_1": 0.5}, 8, 2)
    assert "not converged" in state(8, 8)
    assert "stopped early after 2 epochs" in state(4, 6)
    assert "at a plateau" in state(6, 8) and "not a proven one" not in state(6, 8)
    assert "near a plateau, not a proven one" in state(7, 8)  # one epoch after the best < patience 2


def test_a_beam_row_is_compared_with_the_full_rows_run_of_the_same_model(tmp_path):
    """beam_20 decodes full's seed-0 model: its change is against that model's own run (0.40 → 0.41),
    not against the mean over full's three seeds (0.30), which would add the seeds' spread to it."""
    params = _params(rows=("full", "beam_20"))
    write_row(tmp_path, "ablations/image/full", hits(0, 400),
              metrics={"recall_at_1": 0.3, "recall_at_10": 0.3, "mrr_at_10": 0.3, "n_candidates": 1000})
    write_row(tmp_path, "ablations/image/full/seeds/seed_1", hits(0, 300))
    write_row(tmp_path, "ablations/image/full/seeds/seed_2", hits(0, 200))
    write_row(tmp_path, "ablations/image/beam_20", hits(0, 410))
    seeds = lambda keys, r1: pd.DataFrame({"seed": range(len(keys)), "model_key": keys, "recall_at_1": r1,
                                           "recall_at_10": r1, "mrr_at_10": r1})
    seeds(("k0", "k1", "k2"), (0.4, 0.3, 0.2)).to_csv(tmp_path / "results/ablations/image/full/seeds/seeds.tsv",
                                                     sep="\t", index=False)
    (tmp_path / "results/ablations/image/beam_20/seeds").mkdir()
    seeds(("k0",), (0.41,)).to_csv(tmp_path / "results/ablations/image/beam_20/seeds/seeds.tsv", sep="\t", index=False)
    row = report.ablation_table(tmp_path, params).set_index("row").loc["beam_20"]
    assert row["delta_recall_at_1"] == pytest.approx(0.01)
    assert row["rel_delta_recall_at_1"] == pytest.approx(0.01 / 0.4)
    assert row["delta_r1_ci95_low"] > 0  # 10 more hits, no misses: paired over the same model
    # a row that trains its own model (another key) is still compared with all of full's seeds
    seeds(("other",), (0.41,)).to_csv(tmp_path / "results/ablations/image/beam_20/seeds/seeds.tsv", sep="\t",
                                      index=False)
    row = report.ablation_table(tmp_path, params).set_index("row").loc["beam_20"]
    assert row["delta_recall_at_1"] == pytest.approx(0.11)


def test_the_summary_flags_the_grids_verdicts_when_its_models_are_budget_limited():
    claims = pd.DataFrame([{"claim": "The K-Means coarse token helps", "task": "image", "delta": -0.001,
                            "ci_low": -0.02, "ci_high": 0.02, "verdict": "inconclusive",
                            "evidence": "results/tables/ablations.md"}])
    assert "come from budget-limited models" in report.evidence_summary(claims, pd.DataFrame(), grid_budget_limited=True)
    assert "budget-limited" not in report.evidence_summary(claims, pd.DataFrame(), grid_budget_limited=False)
