"""The smoke pipeline (data → features → identifiers → train → evaluate) end to end on every real-dataset
fixture, in-process and without network: tiny random-weight CLIP/CLAP models, the bundled MiniLM."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cartlib.config import params_from_dict
from cartlib.paths import task_paths
from cartlib.stages import captions as captions_stage
from cartlib.stages import data as data_stage
from cartlib.stages import evaluate as evaluate_stage
from cartlib.stages import features as features_stage
from cartlib.stages import identifiers as identifiers_stage
from cartlib.stages import train as train_stage

from test_real_datasets import (make_audiocaps, make_clotho, make_coco, make_flickr30k, make_msrvtt,  # noqa: F401
                                make_msvd, tiny_clap, tiny_clip)

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"
METRIC_KEYS = {"recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "n_queries", "n_candidates"}

# dataset → (fixture writer, task, encoder, tiny model fixture)
CASES = {
    "flickr30k": (make_flickr30k, "image", "clip", "tiny_clip"),
    "coco": (make_coco, "image", "clip", "tiny_clip"),
    "audiocaps": (make_audiocaps, "audio", "clap", "tiny_clap"),
    "clotho": (make_clotho, "audio", "clap", "tiny_clap"),
    "msrvtt": (make_msrvtt, "video", "clip", "tiny_clip"),
    "msvd": (make_msvd, "video", "clip", "tiny_clip"),
}
# sizes that fit a fixture of 4–5 items (2 of them in the test gallery) and keep each run to seconds
TINY = {
    "identifiers": {"n_clusters": 2, "codebook_size": 2, "n_levels": 2, "latent_dim": 8, "hidden_dim": 16,
                    "epochs": 2, "batch_size": 8, "compare": ["cart", "atomic"]},
    # the fixtures ship no pseudo_captions.jsonl: caption enhancement is turned off knowingly (with it on,
    # the train stage refuses to run rather than score a silent zero)
    "train": {"epochs": 1, "d_model": 32, "n_heads": 4, "n_layers": 1, "batch_size": 16,
              "caption_enhancement": False},
    "evaluate": {"beam": 2, "top_k": 2},  # evaluate refuses top_k > the test gallery (2 items here)
}


def smoke_params(*, task: str, dataset: str, root: Path, encoder: str, model_path: Path):
    raw = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    raw["base"].update(scale="smoke", tasks=[task], device="cpu")
    raw["data"].update(dataset=dataset, root=str(root), on_missing="fail", max_items=0)
    raw["features"].update(encoder=encoder, model_path=str(model_path))
    smoke = raw.setdefault("smoke", {})
    for section, values in TINY.items():  # the smoke overrides win at smoke scale, so set them there
        smoke.setdefault(section, {}).update(values)
    params = params_from_dict(raw, source=str(PARAMS_YAML))
    assert params.smoke and params.data.dataset == dataset and params.features.encoder == encoder
    assert params.identifiers.n_clusters == 2 and params.train.d_model == 32 and params.evaluate.top_k == 2
    return params


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    """An empty, already-migrated MLflow sqlite store. Creating one runs ~100 alembic migrations (≈ 5 s);
    copied into each temporary repository root, the stages still log every run to <root>/mlflow.db."""
    from mlflow import MlflowClient

    from cartlib import tracking

    root = tmp_path_factory.mktemp("mlflow")
    MlflowClient(tracking_uri=tracking.tracking_uri(root)).search_experiments()  # creates and migrates the db
    return root / "mlflow.db"


def repo_paths(tmp_path: Path, task: str, mlflow_store: Path):
    paths = task_paths(tmp_path / "repo", task)
    paths.root.mkdir(parents=True)
    shutil.copy2(mlflow_store, paths.root / "mlflow.db")
    return paths


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")  # the stages return their figures open; five stages a run add up


def run_pipeline(params, paths):
    out = {}
    for name, stage in (("data", data_stage), ("features", features_stage), ("captions", captions_stage),
                        ("identifiers", identifiers_stage),
                        ("train", train_stage), ("evaluate", evaluate_stage)):
        out[name] = stage.run(params, paths, progress=False)
        assert out[name].mlflow_run_id, f"stage {name}: no MLflow run logged"
    return out


def check_outputs(paths, n_test: int):
    items = pd.read_csv(paths.dataset / "items.tsv", sep="\t", dtype=str)
    test_ids = set(items.loc[items["split"] == "test", "item_id"])
    assert len(test_ids) == n_test
    qrels = pd.read_csv(paths.qrels, sep="\t", dtype=str)
    for stage in ("features", "evaluate"):
        folder = paths.results(stage)
        m = json.loads((folder / "metrics.json").read_text())
        assert METRIC_KEYS <= set(m), (stage, sorted(m))
        assert m["n_queries"] == qrels["query_id"].nunique() and m["n_candidates"] == n_test
        run = pd.read_csv(folder / "run.tsv", sep="\t", dtype={"query_id": str, "item_id": str})
        depth = int(run.groupby("query_id").size().max())
        # a cut-off beyond the lists (top_k < k) and short of the whole gallery is not applicable: null
        for key, k in (("recall_at_5", 5), ("recall_at_10", 10), ("mrr_at_10", 10)):
            assert (m[key] is None) == (depth < k and depth < n_test), (stage, key, depth, m[key])
        recalls = [m[f"recall_at_{k}"] for k in (1, 5, 10) if m[f"recall_at_{k}"] is not None]
        assert 0.0 <= recalls[0] and recalls == sorted(recalls) and recalls[-1] <= 1.0
        assert m["mrr_at_10"] is None or 0.0 <= m["mrr_at_10"] <= 1.0
        assert list(run.columns) == ["query_id", "rank", "item_id", "score"]
        assert len(run) and set(run["item_id"]) <= test_ids, stage  # only the test gallery is ranked
        assert set(run["query_id"]) <= set(qrels["query_id"])
    assert (paths.results("identifiers") / "metrics.json").exists()
    assert (paths.results("train") / "metrics.json").exists()
    assert (paths.models / "cart.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(CASES))
def test_smoke_pipeline_on_real_fixture(dataset, tmp_path, request, mlflow_store):
    make, task, encoder, model_fixture = CASES[dataset]
    root = make(tmp_path / dataset)
    model_path = request.getfixturevalue(model_fixture)
    params = smoke_params(task=task, dataset=dataset, root=root, encoder=encoder, model_path=model_path)
    paths = repo_paths(tmp_path, task, mlflow_store)
    out = run_pipeline(params, paths)
    n_test = out["data"].metrics["n_test"]
    assert n_test == 2
    feats = out["features"].features
    assert feats.items.shape[0] == out["data"].metrics["n_items"]
    assert np.allclose(np.linalg.norm(feats.items, axis=1), 1, atol=1e-4)
    assert set(out["identifiers"].codes) == {"cart", "atomic"}
    check_outputs(paths, n_test)


def write_features_bundle(root: Path, *, dim: int = 6) -> Path:
    """A `features` dataset: items/captions tables with their vectors (what an external extractor gives)."""
    root.mkdir(parents=True)
    ids = ["t1", "t2", "t3", "r1", "r2", "r3", "r4", "v1"]
    splits = ["test"] * 3 + ["train"] * 4 + ["val"]
    pd.DataFrame({"item_id": ids, "split": splits}).to_csv(root / "items.tsv", sep="\t", index=False)
    rng = np.random.default_rng(0)
    item_vecs = rng.normal(size=(len(ids), dim))
    np.save(root / "items.npy", item_vecs)
    rows, vecs = [], []
    for k, i in enumerate(ids):
        for j in range(3):
            rows.append({"item_id": i, "text": f"object {i} seen in scene {k} take {j}", "kind": "reference"})
            vecs.append(item_vecs[k] + 0.1 * rng.normal(size=dim))
        rows.append({"item_id": i, "text": f"maybe object {i}", "kind": "pseudo"})
        vecs.append(item_vecs[k] + 0.3 * rng.normal(size=dim))
    pd.DataFrame(rows).to_csv(root / "captions.tsv", sep="\t", index=False)
    np.save(root / "captions.npy", np.asarray(vecs))
    return root


@pytest.mark.slow
def test_smoke_pipeline_on_precomputed_features(tmp_path, mlflow_store):
    root = write_features_bundle(tmp_path / "bundle")
    params = smoke_params(task="image", dataset="features", root=root, encoder="precomputed", model_path=root)
    paths = repo_paths(tmp_path, "image", mlflow_store)
    out = run_pipeline(params, paths)
    assert (out["data"].metrics["n_train"], out["data"].metrics["n_test"], out["data"].metrics["n_val"]) == (4, 3, 1)
    assert out["features"].features.items.shape == (8, 6)  # the val item is a corpus item
    assert out["train"].metrics["n_val_queries"] == 3  # its reference captions are the validation queries
    # the vectors are the ones brought along (unit-normalised), in items.tsv order
    raw = np.load(root / "items.npy")
    order = [["t1", "t2", "t3", "r1", "r2", "r3", "r4", "v1"].index(i) for i in out["features"].features.item_ids]
    want = raw[order] / np.linalg.norm(raw[order], axis=1, keepdims=True)
    assert np.allclose(out["features"].features.items, want, atol=1e-5)
    assert out["features"].metrics["recall_at_1"] > 0.5  # captions sit next to their item: the baseline finds it
    check_outputs(paths, 3)


@pytest.mark.slow
def test_data_stage_keeps_pseudo_captions_of_a_features_dataset(tmp_path, mlflow_store):
    root = write_features_bundle(tmp_path / "bundle")
    params = smoke_params(task="image", dataset="features", root=root, encoder="precomputed", model_path=root)
    result = data_stage.run(params, repo_paths(tmp_path, "image", mlflow_store), progress=False)
    assert params.data.n_pseudo == 2
    assert result.metrics["n_pseudo_captions"] == 8  # one `kind: pseudo` row per kept item (≤ data.n_pseudo), val included
