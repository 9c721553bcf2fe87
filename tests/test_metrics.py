import numpy as np
import pandas as pd
import pytest

from cartlib.metrics import metrics_from_run, retrieval_metrics, run_table


def test_metrics_match_hand_count():
    ranked = np.array([
        ["a", "b", "c"],   # gold a at rank 1
        ["b", "a", "c"],   # gold a at rank 2
        ["b", "c", "d"],   # gold a missing
        ["x", "y", "z"],   # gold z at rank 3
    ])
    gold = np.array(["a", "a", "a", "z"])
    m = retrieval_metrics(ranked, gold, ks=(1, 2, 3), mrr_k=3, n_candidates=26)
    assert m["recall_at_1"] == pytest.approx(1 / 4)
    assert m["recall_at_2"] == pytest.approx(2 / 4)
    assert m["recall_at_3"] == pytest.approx(3 / 4)
    assert m["mrr_at_3"] == pytest.approx((1 + 1 / 2 + 0 + 1 / 3) / 4)
    assert m["n_queries"] == 4 and m["n_candidates"] == 26


def test_run_table_round_trip_recomputes_metrics():
    rng = np.random.default_rng(0)
    items = np.array([f"i{j}" for j in range(30)])
    ranked = np.stack([rng.permutation(items)[:10] for _ in range(50)])
    gold = np.where(rng.random(50) < 0.5, ranked[:, 0], items[rng.integers(0, 30, 50)])
    scores = -np.sort(rng.random((50, 10)), axis=1)[:, ::-1] * -1
    qids = [f"q{j}" for j in range(50)]
    run = run_table(qids, ranked, scores)
    assert list(run.columns) == ["query_id", "rank", "item_id", "score"]
    assert run["rank"].min() == 1 and run.groupby("query_id").size().max() == 10
    qrels = pd.DataFrame({"query_id": qids, "item_id": gold})
    assert metrics_from_run(run, qrels) == retrieval_metrics(ranked, gold)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="Q"):
        retrieval_metrics(np.zeros((3, 2)), np.zeros(4))
