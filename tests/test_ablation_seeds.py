"""Seed replicates of the ablation rows (cartlib.stages.variant): which rows get which seeds, what
each replicate overrides, and the row's metrics as the mean over its seeds (hand counts)."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from cartlib.config import load_params
from cartlib.stages.variant import VariantResult, mean_over_seeds, row_seeds, seed_overrides


def test_the_papers_rows_get_every_seed_and_the_others_the_first():
    params = load_params("params.yaml")
    assert params.ablations.seeds == (0, 1, 2)
    for row in ("full", "no_consistency", "no_fusion", "no_kmeans", "no_rqvae"):
        assert row_seeds(params, row) == (0, 1, 2)
    for row in ("k_16", "beam_5", "no_fusion_matched", "balanced_last_level"):
        assert row_seeds(params, row) == (0,)
    smaller = dataclasses.replace(params, ablations=dataclasses.replace(params.ablations, seeds=(4, 5)))
    assert row_seeds(smaller, "full") == (4, 5) and row_seeds(smaller, "k_16") == (4,)


def test_a_replicate_changes_the_training_seed_and_own_identifiers_seed_only():
    assert seed_overrides({}, 2) == {"train": {"seed": 2}}
    assert seed_overrides({"train": {"fusion": False}}, 1) == {"train": {"fusion": False, "seed": 1}}
    # the scheme alone: the identifiers stage's table is used, its seed stays
    assert seed_overrides({"identifiers": {"scheme": "rqvae_only"}}, 1) == {
        "identifiers": {"scheme": "rqvae_only"}, "train": {"seed": 1}}
    # a row that builds its own table draws it with the replicate's seed too
    assert seed_overrides({"identifiers": {"n_clusters": 16}}, 2) == {
        "identifiers": {"n_clusters": 16, "seed": 2}, "train": {"seed": 2}}
    row = {"train": {"fusion": False}}
    seed_overrides(row, 3)
    assert row == {"train": {"fusion": False}}  # the row's own overrides are not modified


def _result(r1, r10):
    return VariantResult({"recall_at_1": r1, "recall_at_5": 0.5, "recall_at_10": r10, "mrr_at_10": r1,
                          "model_key": f"k{r1}"}, pd.DataFrame(), pd.DataFrame(), f"k{r1}", False)


def test_row_metrics_are_the_mean_over_seeds_and_not_applicable_stays_empty():
    m = mean_over_seeds({0: _result(0.2, None), 1: _result(0.4, None), 2: _result(0.3, None)})
    assert m["recall_at_1"] == pytest.approx(0.3) and m["mrr_at_10"] == pytest.approx(0.3)
    assert m["recall_at_10"] is None and m["n_seeds"] == 3
    assert m["model_key"] == "k0.2"  # the first seed's descriptive fields
