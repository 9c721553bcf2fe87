import numpy as np
import pandas as pd
import pytest

from cartlib.metrics import group_qrels, metrics_from_run, relevance_stats, retrieval_metrics, run_table


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


def test_several_relevant_items_count_as_trec_eval_success_and_recip_rank():
    """Hand count of trec_eval's success@k and recip_rank (cut at k) with several relevant items."""
    ranked = np.array([
        ["a", "b", "c"],   # relevant {b, c}: first relevant at rank 2
        ["x", "y", "z"],   # relevant {q}: none in the list
        ["c", "a", "b"],   # relevant {a, b, c}: rank 1 (more relevant items do not add up)
        ["d", "", ""],     # relevant {d, e}: rank 1, empty slots never match
    ])
    gold = [{"b", "c"}, {"q"}, {"a", "b", "c"}, frozenset({"d", "e"})]
    m = retrieval_metrics(ranked, gold, ks=(1, 2, 3), mrr_k=3)
    assert m["recall_at_1"] == pytest.approx(2 / 4)
    assert m["recall_at_2"] == m["recall_at_3"] == pytest.approx(3 / 4)
    assert m["mrr_at_3"] == pytest.approx((1 / 2 + 0 + 1 + 1) / 4)
    # the run file + qrels with one row per relevant item give the same numbers
    run = run_table(["q0", "q1", "q2", "q3"], ranked, -np.tile(np.arange(3.0), (4, 1)))
    qrels = pd.DataFrame([(f"q{i}", x) for i, rel in enumerate(gold) for x in sorted(rel)],
                         columns=["query_id", "item_id"])
    again = metrics_from_run(run, qrels, depth=10)  # a top-10 run whose lists came out shorter
    assert again["recall_at_1"] == pytest.approx(2 / 4) and again["mrr_at_10"] == pytest.approx(2.5 / 4)
    assert again["n_queries"] == 4  # each query once, however many relevant rows it has


def test_group_qrels_and_relevance_stats_hand_count():
    qrels = pd.DataFrame({"query_id": ["q2", "q1", "q2", "q3", "q2"], "item_id": ["a", "b", "c", "a", "d"]})
    rel = group_qrels(qrels)
    assert list(rel.query_ids) == ["q2", "q1", "q3"] and rel.relevant == [{"a", "c", "d"}, {"b"}, {"a"}]
    assert relevance_stats(qrels) == {"mean_relevant_per_query": pytest.approx(5 / 3),
                                      "share_multi_relevant": pytest.approx(1 / 3)}


def test_metrics_beyond_the_list_length_are_not_applicable():
    """A top-1 or top-5 row (the beam_1 / beam_5 ablations) has no recall@10 and no MRR@10."""
    ranked = np.array([["a"], ["b"], ["c"]])
    gold = np.array(["a", "x", "c"])
    m = retrieval_metrics(ranked, gold, n_candidates=100)
    assert m["recall_at_1"] == pytest.approx(2 / 3)
    assert m["recall_at_5"] is None and m["recall_at_10"] is None and m["mrr_at_10"] is None
    five = retrieval_metrics(np.array([list("abcde"), list("vwxyz")]), np.array(["e", "q"]), n_candidates=100)
    assert five["recall_at_5"] == pytest.approx(1 / 2) and five["recall_at_10"] is None and five["mrr_at_10"] is None
    # the same from the run file: its depth is the deepest rank, or the one given
    run = run_table(["q0", "q1", "q2"], ranked, np.zeros((3, 1)))
    qrels = pd.DataFrame({"query_id": ["q0", "q1", "q2"], "item_id": gold})
    assert metrics_from_run(run, qrels)["recall_at_10"] is None
    assert metrics_from_run(run, qrels, depth=10)["recall_at_10"] == pytest.approx(2 / 3)


def test_a_list_covering_the_whole_gallery_is_complete_at_every_cut_off():
    m = retrieval_metrics(np.array([["b", "a", "c"]]), np.array(["c"]), n_candidates=3)
    assert m["recall_at_10"] == 1.0 and m["mrr_at_10"] == pytest.approx(1 / 3)


def test_not_applicable_is_null_in_metrics_json_and_empty_in_a_table(tmp_path):
    from cartlib import io

    m = retrieval_metrics(np.array([["a"], ["b"]]), np.array(["a", "a"]), n_candidates=50)
    text = io.write_json(tmp_path / "metrics.json", m).read_text()
    assert "NaN" not in text and '"recall_at_10": null' in text
    assert io.read_json(tmp_path / "metrics.json")["recall_at_10"] is None
    io.write_dataframe_tsv(tmp_path / "t.tsv", pd.DataFrame([m, {**m, "recall_at_10": 0.5}]))
    rows = (tmp_path / "t.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert rows[1].split("\t")[header.index("recall_at_10")] == ""
