"""The baselines stage writes every system's ranked lists as a run file, byte-stable across reruns."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cartlib import metrics as M
from cartlib import tracking
from cartlib.captions.io import pseudo_captions_path, write_dataset_pseudo_captions
from cartlib.config import load_params
from cartlib.data import schema
from cartlib.data.features import save_features
from cartlib.paths import task_paths
from cartlib.stages import baselines as stage

from test_schema import write_tiny

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ["dual_tower_exact", "faiss_flat", "faiss_ivf", "faiss_hnsw", "pseudo_caption", "pseudo_caption_fused"]


def _fake_encoder(texts, **_):
    """Deterministic 8-d unit vectors from the text (no model to load)."""
    out = np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=8)
                    for t in texts]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture
def tiny_task(tmp_path, monkeypatch):
    import cartlib.encoders.text as text

    monkeypatch.setattr(tracking, "log_run", lambda **kw: "run-id")
    monkeypatch.setattr(text, "load_text_encoder", lambda *a, **k: (None, None))
    monkeypatch.setattr(text, "encode_sentences", _fake_encoder)
    paths = task_paths(tmp_path, "image")
    paths.data.mkdir(parents=True)
    folder, qrels = write_tiny(paths.data, n_test=14, n_train=3)
    assert folder == paths.dataset and qrels == paths.qrels
    ds = schema.load_dataset(paths.dataset)
    write_dataset_pseudo_captions(ds, pseudo_captions_path(paths))
    refs = ds.captions[ds.captions["kind"] != "pseudo"]
    rng = np.random.default_rng(0)
    items = rng.normal(size=(len(ds.items), 8)).astype(np.float32)
    save_features(paths.features, items=items / np.linalg.norm(items, axis=1, keepdims=True),
                  caption_ids=refs["caption_id"], captions=_fake_encoder(refs["text"].tolist()),
                  meta={"text_model": "fake"})
    return paths


def test_every_baseline_system_writes_a_run_file_that_recomputes_its_metrics(tiny_task):
    params = load_params(REPO / "params.yaml")
    result = stage.run(params, tiny_task, progress=False)
    out = tiny_task.results("baselines")
    qrels = pd.read_csv(tiny_task.qrels, sep="\t", dtype=str)
    table = result.table.set_index("system")
    assert sorted(result.runs) == sorted(SYSTEMS) == sorted(table.index)
    for system in SYSTEMS:
        run = pd.read_csv(out / "runs" / f"{system}.tsv.gz", sep="\t", dtype={"query_id": str, "item_id": str})
        assert list(run.columns) == M.RUN_COLUMNS
        assert run.groupby("query_id")["rank"].apply(list).map(lambda r: r == list(range(1, len(r) + 1))).all()
        assert run["rank"].max() == 10 and set(run["query_id"]) == set(qrels["query_id"])
        again = M.metrics_from_run(run, qrels, n_candidates=14)
        for key in ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10"):
            assert again[key] == pytest.approx(table.loc[system, key]), (system, key)
    # exact FAISS and the torch matmul rank alike
    a, b = (pd.read_csv(out / "runs" / f"{s}.tsv.gz", sep="\t") for s in ("dual_tower_exact", "faiss_flat"))
    assert (a["item_id"] == b["item_id"]).mean() > 0.95
    assert not (out / "runs" / "dual_tower_exact.timings.tsv").exists()


def test_baseline_run_files_are_byte_stable_across_reruns(tiny_task):
    params = load_params(REPO / "params.yaml")
    runs = tiny_task.results("baselines") / "runs"
    stage.run(params, tiny_task, progress=False)
    first = {p.name: p.read_bytes() for p in sorted(runs.iterdir())}
    stage.run(params, tiny_task, progress=False)
    assert {p.name: p.read_bytes() for p in sorted(runs.iterdir())} == first and len(first) == len(SYSTEMS)


def test_ranked_run_leaves_out_slots_a_system_did_not_fill():
    ids, run = stage.ranked_run(np.array(["q0", "q1"]), np.array(["a", "b", "c"]),
                                np.array([[2, -1], [0, 1]]), np.array([[0.5, -3.4e38], [0.9, -np.inf]]))
    assert ids.tolist() == [["c", ""], ["a", ""]]  # FAISS's -1 and a -inf score are no item (never the last one)
    assert run.to_dict("list") == {"query_id": ["q0", "q1"], "rank": [1, 1], "item_id": ["c", "a"], "score": [0.5, 0.9]}
