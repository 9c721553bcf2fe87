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


def test_training_pairs_never_use_test_queries(tmp_path):
    folder, _ = write_tiny(tmp_path, n_test=2, n_train=3)
    ds = load_dataset(folder)
    pairs = training_pairs(ds, caption_enhancement=True, n_val_items=1, seed=0)
    test_refs = set(ds.queries("test")["text"])
    assert not test_refs & set(pairs.texts)
    # caption enhancement: the pseudo-captions of test items are training texts
    test_pseudo = set(ds.queries("test", kind="pseudo")["text"])
    assert test_pseudo <= set(pairs.texts)
    # the held-out validation caption is not trained on, and targets a train item
    assert len(pairs.val_texts) == 1 and pairs.val_texts[0] not in pairs.texts
    assert ds.items["split"].iloc[pairs.val_rows[0]] == "train"
    # every text targets the item it describes (hand count: 3 train items × 2 refs − 1 held out + 5 pseudo)
    assert len(pairs.texts) == 3 * 2 - 1 + 5
    for text, row in zip(pairs.texts, pairs.rows):
        assert f"item {row} " in text or f"pseudo {row} " in text
    off = training_pairs(ds, caption_enhancement=False, n_val_items=0, seed=0)
    assert set(off.kinds) == {"reference"} and len(off.texts) == 6


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
