"""The comparison, ablation, baseline, t-SNE and report stages' building blocks, against oracles."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest
import yaml

from cartlib.config import ConfigError, load_params, params_from_dict, with_overrides
from cartlib.baselines import faiss_indexes, recall_vs_exact
from cartlib.stages.baselines import pseudo_caption_scores
from cartlib.stages.tsne import prefix_ratio
from cartlib.stages.variant import grid_params, query_subset


def raw_params() -> dict:
    return yaml.safe_load(open("params.yaml"))


# ------------------------------------------------------------------------------------------ config
def test_every_ablation_row_of_params_yaml_is_a_valid_override():
    params = load_params("params.yaml")
    assert "full" in params.ablations.rows
    for row, over in params.ablations.rows.items():
        p = with_overrides(params, over)
        for section, values in over.items():
            for key, value in values.items():
                assert getattr(getattr(p, section), key) == value, (row, section, key)


@pytest.mark.parametrize("row, message", [
    ({"train": {"fusionn": False}}, "ablations.rows.bad.train: unknown key"),
    ({"data": {"n_train": 5}}, "cannot override section(s) ['data']"),
    ({"evaluate": {"beam": 2, "top_k": 5}}, "top_k"),
    ({"identifiers": {"scheme": "nope"}}, "nope"),
])
def test_a_bad_ablation_row_fails_at_load_naming_the_row(row, message):
    raw = raw_params()
    raw["ablations"]["rows"]["bad"] = row
    with pytest.raises(ConfigError, match="ablations.rows.bad") as e:
        params_from_dict(raw)
    assert message in str(e.value)


def test_grid_rows_share_the_grid_schedule_then_apply_their_own_overrides():
    params = load_params("params.yaml")
    full = grid_params(params, params.ablations.rows["full"]).train
    for key, value in params.grid.train.items():
        assert getattr(full, key) == value
    for key in ("lr", "batch_size", "consistency_weight"):  # what the grid leaves alone is the main model's
        if key not in params.grid.train:
            assert getattr(full, key) == getattr(params.train, key)
    no_fusion = grid_params(params, {"train": {"fusion": False}}).train
    assert no_fusion == dataclasses.replace(full, fusion=False)  # the row's override on top, nothing else
    assert full.patience > 0  # the same early-stopping rule as the main model


def test_grid_train_rejects_unknown_train_keys():
    raw = raw_params()
    raw["grid"]["train"] = {"d_modle": 64}
    with pytest.raises(ConfigError, match="grid") as e:
        params_from_dict(raw)
    assert "d_modle" in str(e.value)


def test_query_subset_is_fixed_by_seed_and_sorted():
    qrels = pd.DataFrame({"query_id": [f"q{i}" for i in range(50)], "item_id": ["x"] * 50})
    a, b = query_subset(qrels, 10, 0), query_subset(qrels, 10, 0)
    assert a.equals(b) and len(a) == 10
    assert list(a.index) == list(range(10))
    assert sorted(a["query_id"], key=lambda s: int(s[1:])) == list(a["query_id"])
    assert query_subset(qrels, 0, 0).equals(qrels) and query_subset(qrels, 99, 0).equals(qrels)


# ---------------------------------------------------------------------------------------- baselines
def test_pseudo_caption_scores_are_the_best_pseudo_caption_per_item():
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(6, 5)), rng.normal(size=(9, 5))
    owner = np.array([3, 0, 3, 1, 0, 3, 1, 0, 1])  # item 2 has none
    got = pseudo_caption_scores(q, p, owner, 4)
    for i, j in itertools.product(range(6), range(4)):
        mine = [q[i] @ p[t] for t in range(9) if owner[t] == j]
        assert got[i, j] == pytest.approx(max(mine), rel=1e-5) if mine else got[i, j] == -np.inf


def test_faiss_flat_is_exact_and_approximate_indexes_report_overlap():
    from cartlib.baselines import exact_topk
    from cartlib.config import BaselinesConfig

    rng = np.random.default_rng(1)
    items = rng.normal(size=(300, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[:40] + 0.1 * rng.normal(size=(40, 16)).astype(np.float32)
    exact = exact_topk(queries, items, k=10).indices
    idx = faiss_indexes(items, BaselinesConfig(ivf_nlist=4, ivf_nprobe=4, hnsw_ef_search=200), seed=0)
    flat = idx["faiss_flat"].search(queries, 10)[1]
    assert recall_vs_exact(flat, exact) == 1.0
    assert recall_vs_exact(idx["faiss_ivf"].search(queries, 10)[1], exact) == 1.0  # nprobe = nlist: exhaustive
    assert 0.5 < recall_vs_exact(idx["faiss_hnsw"].search(queries, 10)[1], exact) <= 1.0
    assert recall_vs_exact(np.array([[1, 2, 3]]), np.array([[3, 4, 5]])) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------- tsne
def test_prefix_ratio_by_brute_force():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 4))
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1, 2])
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    within, between = [], []
    for i, j in itertools.permutations(range(12), 2):
        (within if labels[i] == labels[j] else between).append(1 - u[i] @ u[j])
    assert prefix_ratio(x, labels) == pytest.approx(np.mean(within) / np.mean(between))
    # two tight, far-apart groups: a ratio far below 1
    tight = np.concatenate([np.tile([1.0, 0, 0], (5, 1)), np.tile([0, 1.0, 0], (5, 1))]) + 0.01 * rng.normal(size=(10, 3))
    assert prefix_ratio(tight, np.repeat([0, 1], 5)) < 0.1


# -------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, message", [
    (["ablations", "--task", "image"], "needs --variant"),
    (["ablations", "--variant", "full"], "needs --task"),
    (["ablations", "--task", "audio", "--variant", "full"], "not one of params.yaml ablations.tasks"),
    (["ablations", "--task", "image", "--variant", "nope"], "not a row of params.yaml ablations.rows"),
    (["report", "--task", "image"], "takes no --task"),
    (["tsne"], "needs --task"),
])
def test_cli_rejects_bad_stage_arguments_before_work(argv, message, capsys):
    from cartlib.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err
