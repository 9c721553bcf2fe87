import numpy as np
import pandas as pd
import pytest

from cartlib.data.features import load_features, save_features
from cartlib.data.schema import DataFormatError, DatasetWriter, load_dataset, load_qrels


def write_tiny(tmp_path, n_test=2, n_train=3, n_val=0, qrels=None):
    """A tiny dataset: test, train, then val items; two reference and one pseudo-caption each."""
    folder, qrels_path, qrels_val = tmp_path / "dataset", tmp_path / "qrels.tsv", tmp_path / "qrels_val.tsv"
    n = n_test + n_train + n_val
    w = DatasetWriter(folder, task="image", dataset="synthetic", n_items=n, media_shape=(4, 4, 3), media_dtype="uint8")
    ids = [f"image-{i:07d}" for i in range(n)]
    splits = ["test"] * n_test + ["train"] * n_train + ["val"] * n_val
    for lo in range(0, n, 2):  # two chunks and a half: streaming
        hi = min(n, lo + 2)
        w.add(item_ids=ids[lo:hi], splits=splits[lo:hi], attributes=[{"i": i} for i in range(lo, hi)],
              captions=[[f"item {i} caption {j}" for j in range(2)] for i in range(lo, hi)],
              pseudo_captions=[[f"pseudo {i}\twith tab"] for i in range(lo, hi)],
              media=np.full((hi - lo, 4, 4, 3), 7, np.uint8))
    w.close(qrels_path=qrels_path, qrels_val_path=qrels_val, qrels=qrels)
    return folder, qrels_path


def test_round_trip(tmp_path):
    folder, qrels_path = write_tiny(tmp_path)
    ds = load_dataset(folder)
    assert len(ds.items) == 5 and ds.media.shape == (5, 4, 4, 3)
    assert list(ds.split_items("test")["item_id"]) == ["image-0000000", "image-0000001"]
    assert len(ds.queries("test")) == 4
    assert (ds.captions["text"].str.contains("\t")).sum() == 0  # tabs cleaned
    qrels = load_qrels(qrels_path, ds)
    assert list(qrels.columns) == ["query_id", "item_id"] and len(qrels) == 4
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_corrupted_file_is_named(tmp_path):
    folder, _ = write_tiny(tmp_path)
    with open(folder / "captions.tsv", "a") as f:
        f.write("x\n")
    with pytest.raises(DataFormatError, match="captions.tsv.*sha256"):
        load_dataset(folder)


def test_missing_file_is_named(tmp_path):
    folder, _ = write_tiny(tmp_path)
    (folder / "media.npy").unlink()
    with pytest.raises(DataFormatError, match="media.npy.*missing"):
        load_dataset(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(DataFormatError, match="run the `data` stage"):
        load_dataset(tmp_path / "nope")


def test_bad_split_value(tmp_path):
    folder, _ = write_tiny(tmp_path)
    items = pd.read_csv(folder / "items.tsv", sep="\t", dtype=str)
    items.loc[0, "split"] = "validation"
    items.to_csv(folder / "items.tsv", sep="\t", index=False)
    with pytest.raises(DataFormatError, match="'validation'"):
        load_dataset(folder, verify_hashes=False)


def test_qrels_naming_a_train_item(tmp_path):
    folder, qrels = write_tiny(tmp_path)
    pd.DataFrame({"query_id": ["image-0000000-c0"], "item_id": ["image-0000004"]}).to_csv(qrels, sep="\t", index=False)
    with pytest.raises(DataFormatError, match="not a test item"):
        load_qrels(qrels, load_dataset(folder))


def test_features_validation(tmp_path):
    folder, _ = write_tiny(tmp_path)
    ds = load_dataset(folder)
    caps = ds.captions[ds.captions["kind"] == "reference"]
    good_items = np.eye(5, 8, dtype=np.float32)
    good_caps = np.ones((len(caps), 8), np.float32)
    save_features(tmp_path / "f", items=good_items, caption_ids=caps["caption_id"], captions=good_caps, meta={})
    f = load_features(tmp_path / "f", ds)
    assert f.items.shape == (5, 8) and f.meta["dim"] == 8
    with pytest.raises(DataFormatError, match="dimension 8, expected 16"):
        load_features(tmp_path / "f", ds, dim=16)
    bad = good_items.copy()
    bad[3, 1] = np.nan
    np.save(tmp_path / "f" / "items.npy", bad)
    with pytest.raises(DataFormatError, match="NaN.*row 3"):
        load_features(tmp_path / "f", ds)
    np.save(tmp_path / "f" / "items.npy", good_items[:4])
    with pytest.raises(DataFormatError, match="4 rows but the dataset has 5"):
        load_features(tmp_path / "f", ds)


def test_val_split_round_trip_with_its_own_qrels(tmp_path):
    folder, qrels_path = write_tiny(tmp_path, n_test=2, n_train=1, n_val=2)
    ds = load_dataset(folder)
    assert ds.manifest["schema_version"] == 2 and ds.manifest["n_val"] == 2
    assert list(ds.items["split"]) == ["test", "test", "train", "val", "val"]
    val = load_qrels(tmp_path / "qrels_val.tsv", ds, split="val")
    assert sorted(val["query_id"]) == sorted(ds.queries("val")["caption_id"]) and len(val) == 4
    assert set(val["item_id"]) == {"image-0000003", "image-0000004"}
    assert len(load_qrels(qrels_path, ds)) == 4  # the test qrels hold test queries only
    with pytest.raises(DataFormatError, match="not a val item"):
        load_qrels(qrels_path, ds, split="val")


def test_complete_qrels_keep_each_query_own_item_and_the_split(tmp_path):
    # test item 0's first caption is also true of test item 1: two relevant items
    own = pd.DataFrame({"query_id": [f"image-000000{i}-c{j}" for i in range(2) for j in range(2)],
                        "item_id": [f"image-000000{i}" for i in range(2) for _ in range(2)]})
    extra = pd.DataFrame({"query_id": ["image-0000000-c0"], "item_id": ["image-0000001"]})
    folder, qrels_path = write_tiny(tmp_path / "a", qrels={"test": pd.concat([own, extra])})
    qrels = load_qrels(qrels_path, load_dataset(folder))
    assert len(qrels) == 5 and set(qrels.loc[qrels["query_id"] == "image-0000000-c0", "item_id"]) == \
        {"image-0000000", "image-0000001"}
    with pytest.raises(DataFormatError, match="own item"):
        write_tiny(tmp_path / "b", qrels={"test": pd.concat([own.iloc[1:], extra])})


def test_manifest_split_counts_and_old_schema_are_refused(tmp_path):
    import json

    folder, _ = write_tiny(tmp_path, n_val=1)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "n_val": 3}))
    with pytest.raises(DataFormatError, match="n_val=3"):
        load_dataset(folder)
    (folder / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    with pytest.raises(DataFormatError, match="schema_version 1"):
        load_dataset(folder)
