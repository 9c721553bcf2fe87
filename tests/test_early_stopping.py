"""Early stopping on validation recall@1 and the best epoch's weights (cartlib.train).

The oracle: a scripted validation curve (the recall@1 of each epoch is replaced by a fixed list),
so the epoch training must stop at and the epoch whose weights must come back are known by hand;
the weights "at epoch e" are those of the same schedule cut after e epochs (``stop_after``).
"""
from __future__ import annotations

import pytest
import torch

import cartlib.train
from cartlib.ids.prefix import PrefixIndex
from cartlib.io import torch_load
from cartlib.train import CHECKPOINT_NAME, ValidationSet, train_cart
from test_train import CODES, SIZES, TEXTS, tiny_model, tokenizer

CURVE = [0.10, 0.50, 0.40, 0.50, 0.30, 0.60, 0.70]  # best 0.50 at epoch 2; epoch 4 only ties it


@pytest.fixture
def scripted_validation(monkeypatch):
    calls = []

    def fake(model, ids, mask, items, index, *, beam, batch_size):
        calls.append(1)
        return CURVE[len(calls) - 1]

    monkeypatch.setattr(cartlib.train, "_recall_at_1", fake)
    return calls


def _kwargs(**over):
    kw = dict(tokenizer=tokenizer(), texts=TEXTS, codes=CODES, epochs=7, batch_size=6, lr=3e-3, seed=1,
              max_length=16, progress=False, consistency_weight=0.5,
              val=ValidationSet(TEXTS[:4], torch.arange(4), PrefixIndex.build(CODES, SIZES), CODES))
    kw.update(over)
    return kw


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stops_after_patience_epochs_without_improvement_and_restores_the_best(scripted_validation, tmp_path):
    result = train_cart(tiny_model(), patience=2, checkpoint_dir=tmp_path / "run", **_kwargs())
    # epochs 3 and 4 do not beat 0.50 (a tie is no improvement): stop after epoch 4
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.best_epoch == 2
    scripted_validation.clear()
    at_two = train_cart(tiny_model(), patience=2, stop_after=2, checkpoint_dir=tmp_path / "two", **_kwargs())
    assert at_two.best_epoch == 2 and _same_weights(result.model, at_two.model)
    # the learning-rate schedule is laid over the 7 epochs allowed: still well above 0 when stopping
    assert result.history[-1]["lr"] > 0.3 * 3e-3


def test_without_patience_it_trains_every_epoch_and_still_keeps_the_best(scripted_validation):
    result = train_cart(tiny_model(), **_kwargs())
    assert len(result.history) == 7 and result.best_epoch == 7  # 0.70 at the last epoch


def test_an_interrupted_early_stopped_run_resumes_to_the_same_stop_and_weights(scripted_validation, tmp_path):
    full = train_cart(tiny_model(), patience=2, checkpoint_dir=tmp_path / "full", **_kwargs())
    scripted_validation.clear()
    train_cart(tiny_model(), patience=2, stop_after=3, checkpoint_dir=tmp_path / "cut", **_kwargs())
    assert torch_load(tmp_path / "cut" / CHECKPOINT_NAME)["best"]["epoch"] == 2
    resumed = train_cart(tiny_model(seed=4), patience=2, resume=True, checkpoint_dir=tmp_path / "cut", **_kwargs())
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4] and resumed.best_epoch == 2
    assert _same_weights(full.model, resumed.model)
    calls = len(scripted_validation)
    again = train_cart(tiny_model(seed=4), patience=2, resume=True, checkpoint_dir=tmp_path / "cut", **_kwargs())
    assert len(scripted_validation) == calls  # a stopped run is over: no epoch is trained or validated
    assert again.best_epoch == 2 and _same_weights(full.model, again.model)


def test_negative_patience_is_rejected():
    with pytest.raises(ValueError, match="patience"):
        train_cart(tiny_model(), patience=-1, **_kwargs())
