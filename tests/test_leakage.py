"""Leakage guard (issue 14): no reference caption of a test or validation item is ever an input of the
media tower's training (`features`) or of CART's training (`train`'s training pairs)."""
from __future__ import annotations

import numpy as np
import pytest

from cartlib.config import Params
from cartlib.data import schema, synthetic
from cartlib.paths import task_paths
from cartlib.stages import features as features_stage
from cartlib.stages.train import training_pairs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> schema.Dataset:
    """A generated image dataset with all three splits (8 test, 10 train, 6 val items)."""
    paths = task_paths(tmp_path_factory.mktemp("repo"), "image")
    n = {"n_test": 8, "n_train": 10, "n_val": 6}
    writer = schema.DatasetWriter(paths.dataset, task="image", dataset="synthetic", n_items=sum(n.values()),
                                  media_shape=synthetic.media_shape("image"), media_dtype="uint8")
    for c in synthetic.generate(task="image", seed=0, n_pseudo=1, **n):
        writer.add(item_ids=c.item_ids, splits=c.splits, attributes=c.attributes, captions=c.captions,
                   pseudo_captions=c.pseudo_captions, media=c.media)
    writer.close(qrels_path=paths.qrels, qrels_val_path=paths.qrels_val)
    return schema.load_dataset(paths.dataset)


def _held_out(ds: schema.Dataset) -> set[str]:
    """caption_ids of every test and val reference caption (the queries)."""
    return set(ds.queries("test")["caption_id"]) | set(ds.queries("val")["caption_id"])


def test_media_tower_trains_on_train_captions_only(dataset, monkeypatch):
    """Run the features stage's tower training up to the call of train_tower and look at its inputs:
    each text vector is tagged with its caption's row, so we know exactly which captions went in."""
    refs = dataset.captions[dataset.captions["kind"] == "reference"].reset_index(drop=True)
    seen = {}

    def tagged(texts, **_):  # vector of caption row r = (r, 0, ...)
        out = np.zeros((len(texts), 4), np.float32)
        out[:, 0] = np.arange(len(texts))
        return out

    def capture(tower, *, media, text, **_):
        seen["media"], seen["text"] = media, text
        raise StopIteration  # the inputs are all this test needs

    monkeypatch.setattr(features_stage.text_enc, "load_text_encoder", lambda: (None, None))
    monkeypatch.setattr(features_stage.text_enc, "encode_sentences", tagged)
    monkeypatch.setattr(features_stage.contrastive, "train_tower", capture)
    paths = task_paths(dataset.folder.parent.parent.parent, "image")
    with pytest.raises(StopIteration):
        features_stage._tower_features(Params(), paths, dataset, "cpu", False)
    used = set(refs["caption_id"].to_numpy()[seen["text"][..., 0].astype(int).ravel()])
    train = dataset.split_items("train")
    assert used and not used & _held_out(dataset)
    assert set(refs.loc[refs["caption_id"].isin(used), "item_id"]) == set(train["item_id"])
    assert np.array_equal(seen["media"], dataset.media[train["media_index"].to_numpy()])


def test_cart_training_pairs_hold_no_test_or_val_reference_caption(dataset):
    caps = dataset.captions.set_index("caption_id")
    split_of = dataset.items.set_index("item_id")["split"]
    for kwargs in ({}, {"max_train_items": 3}, {"refs_per_item": 2}):
        for enhance in (True, False):
            pairs = training_pairs(dataset, caption_enhancement=enhance, seed=0, **kwargs)
            rows = dataset.items["item_id"].to_numpy()[pairs.rows]
            trained = set(zip(rows, pairs.texts, pairs.kinds))
            for cid in _held_out(dataset):  # never a reference (target, text) pair
                item, text = caps.loc[cid, "item_id"], caps.loc[cid, "text"]
                assert (item, text, "reference") not in trained
            assert set(split_of[rows[pairs.kinds == "reference"]]) == {"train"}
            if enhance:  # the corpus items' pseudo-captions are inputs: test and val items are targets too
                assert set(split_of[rows[pairs.kinds == "pseudo"]]) >= {"test", "val"}
