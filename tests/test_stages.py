"""Stage helpers that decide what CART trains and is evaluated on."""
import numpy as np
import pytest

from cartlib.config import TrainConfig
from cartlib.data.idstore import IdentifierTable, load_identifiers, save_identifiers
from cartlib.data.schema import DataFormatError, load_dataset
from cartlib.ids.vocab import Vocabulary
from cartlib.stages.evaluate import first_wrong_level
from cartlib.stages.train import build_model, load_bundle, save_bundle, training_pairs

from test_schema import write_tiny


def test_training_pairs_never_use_test_or_val_queries(tmp_path):
    folder, _ = write_tiny(tmp_path, n_test=2, n_train=3, n_val=2)
    ds = load_dataset(folder)
    pairs = training_pairs(ds, caption_enhancement=True, seed=0)
    held_out = set(ds.queries("test")["text"]) | set(ds.queries("val")["text"])
    assert not held_out & set(pairs.texts)
    # caption enhancement: the pseudo-captions of test and val items (corpus items) are training texts
    corpus_pseudo = set(ds.queries("test", kind="pseudo")["text"]) | set(ds.queries("val", kind="pseudo")["text"])
    assert corpus_pseudo <= set(pairs.texts)
    # every text targets the item it describes (hand count: 3 train items × 2 refs + 7 pseudo)
    assert len(pairs.texts) == 3 * 2 + 7
    for text, row in zip(pairs.texts, pairs.rows):
        assert f"item {row} " in text or f"pseudo {row} " in text
    off = training_pairs(ds, caption_enhancement=False, seed=0)
    assert set(off.kinds) == {"reference"} and len(off.texts) == 6
    # max_train_items subsets the train items only: every test and val pseudo-caption stays
    few = training_pairs(ds, caption_enhancement=True, seed=0, max_train_items=1)
    assert corpus_pseudo <= set(few.texts) and len(few.texts) == 1 * 2 + 1 + 4


def test_first_wrong_level_hand_count():
    gold = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]])
    gen = np.array([[1, 2, 3], [0, 2, 3], [1, 0, 0], [1, 2, 4]])
    assert first_wrong_level(gen, gold).tolist() == [-1, 0, 1, 2]


def _table(codes, scheme="cart"):
    vocab = Vocabulary(level_sizes=tuple(int(c) + 1 for c in np.max(codes, 0)))
    return IdentifierTable(scheme, codes, np.array(["a", "b", "c"]), vocab, vocab.fingerprint(codes), {})


def test_checkpoint_against_another_identifier_table_is_refused(tmp_path):
    cfg = TrainConfig(d_model=32, n_heads=4, n_layers=1)
    trained_on = _table(np.array([[0, 0], [0, 1], [1, 0]]))
    _, model = build_model(cfg, trained_on.vocab.level_sizes)
    save_bundle(tmp_path / "cart.pt", model=model, cfg=cfg, table=trained_on, history=[])
    _, again, _ = load_bundle(tmp_path / "cart.pt", table=trained_on)  # same table: fine
    assert again.level_sizes == (2, 2)
    other = _table(np.array([[0, 1], [0, 0], [1, 0]]))  # same sizes, items swapped
    with pytest.raises(ValueError, match="trained against identifier table"):
        load_bundle(tmp_path / "cart.pt", table=other)


def test_identifier_store_round_trip_and_mismatch(tmp_path):
    codes = np.array([[0, 0], [0, 1], [1, 0]])
    save_identifiers(tmp_path, scheme="cart", codes=codes, item_ids=["a", "b", "c"], level_sizes=(2, 2),
                     has_unique_token=True, meta={})
    table = load_identifiers(tmp_path, "cart", item_ids=["a", "b", "c"])
    assert (table.codes == codes).all()
    with pytest.raises(DataFormatError, match="item ids differ"):
        load_identifiers(tmp_path, "cart", item_ids=["a", "b", "x"])
    with pytest.raises(DataFormatError, match="identifier table not found"):
        load_identifiers(tmp_path, "atomic")
    with pytest.raises(ValueError, match="level 1"):
        save_identifiers(tmp_path, scheme="bad", codes=np.array([[0, 5]]), item_ids=["a"], level_sizes=(2, 2),
                         has_unique_token=True, meta={})


def test_validation_set_ranks_val_queries_against_the_val_items_alone(tmp_path):
    import pandas as pd
    import torch

    from cartlib.data.schema import load_qrels
    from cartlib.stages.train import validation_set

    own = pd.DataFrame({"query_id": [f"image-000000{i}-c{j}" for i in (5, 6) for j in range(2)],
                        "item_id": [f"image-000000{i}" for i in (5, 6) for _ in range(2)]})
    extra = pd.DataFrame({"query_id": ["image-0000006-c1"], "item_id": ["image-0000005"]})  # true of both
    folder, _ = write_tiny(tmp_path, n_test=2, n_train=3, n_val=2, qrels={"val": pd.concat([own, extra])})
    ds = load_dataset(folder)
    qrels_val = load_qrels(tmp_path / "qrels_val.tsv", ds, split="val")
    codes = torch.tensor([[i % 3, i // 3] for i in range(7)])
    val = validation_set(ds, qrels_val, codes, (3, 3))
    assert val.prefix_index.n_items == 2 and torch.equal(val.codes, codes[5:])  # the val items only
    assert list(val.texts) == ["item 5 caption 0", "item 5 caption 1", "item 6 caption 0", "item 6 caption 1"]
    assert val.items.tolist() == [[0, -1], [0, -1], [1, -1], [0, 1]]  # rows of the val gallery, -1 pads
    assert validation_set(ds, qrels_val.iloc[:0], codes, (3, 3)) is None
