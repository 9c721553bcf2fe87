import numpy as np
import pandas as pd
import pytest

from cartlib.data.features import load_features, save_features
from cartlib.data.schema import DataFormatError, DatasetWriter, load_dataset, load_qrels


def write_tiny(tmp_path, n_test=2, n_train=3):
    folder, qrels = tmp_path / "dataset", tmp_path / "qrels.tsv"
    n = n_test + n_train
    w = DatasetWriter(folder, task="image", dataset="synthetic", n_items=n, media_shape=(4, 4, 3), media_dtype="uint8")
    ids = [f"image-{i:07d}" for i in range(n)]
    splits = ["test"] * n_test + ["train"] * n_train
    for lo in range(0, n, 2):  # two chunks and a half: streaming
        hi = min(n, lo + 2)
        w.add(item_ids=ids[lo:hi], splits=splits[lo:hi], attributes=[{"i": i} for i in range(lo, hi)],
              captions=[[f"item {i} caption {j}" for j in range(2)] for i in range(lo, hi)],
              pseudo_captions=[[f"pseudo {i}\twith tab"] for i in range(lo, hi)],
              media=np.full((hi - lo, 4, 4, 3), 7, np.uint8))
    w.close(qrels_path=qrels)
    return folder, qrels


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
