"""Constrained beam search (CART inference) against exhaustive scoring and a plain reference search.

The independent reference is a plain beam search written as simply as possible below: no cache,
no batching, Python sets for the valid prefixes, one teacher-forced forward per beam per level.
"""
from __future__ import annotations

import functools
import itertools
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import BertConfig, BertModel

from cartlib.decode import (
    GenerationOutput,
    constrained_beam_search,
    exhaustive_scores,
    unconstrained_beam_search,
)
from cartlib.ids.prefix import PrefixIndex
from cartlib.model.cart import CartModel, EncoderStates

S, D_ENC, T = 2, 16, 5


@functools.lru_cache(maxsize=None)  # models are only read (eval mode, no gradient)
def tiny_model(level_sizes: tuple[int, ...], *, fusion: bool = True, seed: int = 0) -> CartModel:
    torch.manual_seed(seed)
    enc = BertModel(
        BertConfig(vocab_size=30, hidden_size=D_ENC, num_hidden_layers=S, num_attention_heads=2, intermediate_size=32)
    )
    model = CartModel(
        text_encoder=enc, freeze_encoder=True, level_sizes=level_sizes, d_model=16, n_layers=2, n_heads=2,
        dropout=0.1, fusion=fusion,
    )
    with torch.no_grad():
        model.head.weight.mul_(8.0)  # peaked distributions: well separated scores, few near-ties
    return model.eval()


def random_states(b: int, seed: int = 0) -> EncoderStates:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, T, dtype=torch.bool)
    mask[0, 3:] = False
    return EncoderStates(torch.randn(S, b, T, D_ENC, generator=g), mask)


def random_table(n: int, sizes: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = list(itertools.product(*(range(k) for k in sizes)))
    pick = torch.randperm(len(rows), generator=g)[:n]
    return torch.tensor([rows[i] for i in pick.tolist()])


TRIES = {
    "single": ((3, 2, 2), torch.tensor([[2, 1, 0]])),
    "shared-prefix": ((2, 3, 5), torch.tensor([[1, 2, u] for u in (0, 3, 4, 1)])),
    "random": ((3, 4, 3), random_table(20, (3, 4, 3), 1)),
    "full-fanout": ((3, 2, 2), torch.tensor(list(itertools.product(range(3), range(2), range(2))))),
    "deep": ((2, 3, 2, 3), random_table(15, (2, 3, 2, 3), 2)),
}


def assert_same_ranking(out_items: torch.Tensor, out_scores: torch.Tensor, ref_items, ref_scores) -> None:
    """Equal scores (fp tolerance); equal items wherever the reference scores are not near-tied."""
    ref_scores = torch.as_tensor(ref_scores, dtype=torch.float32)
    ref_items = torch.as_tensor(ref_items)
    torch.testing.assert_close(out_scores, ref_scores, rtol=1e-5, atol=1e-5)
    for i, (a, b) in enumerate(zip(out_items.tolist(), ref_items.tolist())):
        if a != b:  # allowed only inside a run of (near) ties
            assert math.isclose(float(ref_scores[i]), float(out_scores[i]), abs_tol=1e-5)
            tied = (ref_scores - ref_scores[i]).abs() <= 1e-5
            assert a in ref_items[tied].tolist()


def check_valid(out: GenerationOutput, codes: torch.Tensor) -> None:
    alive = out.items >= 0
    assert torch.isfinite(out.scores[alive]).all() and (out.scores[~alive] == -math.inf).all()
    assert torch.equal(codes[out.items[alive]], out.codes[alive])  # every identifier is a row of codes
    for row in out.items.tolist():
        live = [r for r in row if r >= 0]
        assert len(live) == len(set(live))  # no identifier twice
    assert (out.scores[:, 1:] <= out.scores[:, :-1]).all()  # best first


@pytest.mark.parametrize("fusion", [True, False])
@pytest.mark.parametrize("trie", list(TRIES))
def test_wide_beam_equals_exhaustive_ranking(trie: str, fusion: bool) -> None:
    sizes, codes = TRIES[trie]
    model, enc = tiny_model(sizes, fusion=fusion), random_states(4)
    index = PrefixIndex.build(codes, sizes)
    n = codes.shape[0]
    full = exhaustive_scores(model, enc, codes)  # (B, N)
    assert full.shape == (4, n)
    out = constrained_beam_search(model, enc, index, beam=n + 2, top_k=n)  # beam >= N: exact
    check_valid(out, codes)
    assert (out.items >= 0).all()
    ref_scores, ref_items = full.sort(1, descending=True)
    for q in range(4):
        assert_same_ranking(out.items[q], out.scores[q], ref_items[q], ref_scores[q])
    # scores are the log-probabilities of exactly the returned identifiers
    torch.testing.assert_close(out.scores, full.gather(1, out.items), rtol=1e-5, atol=1e-5)


def reference_beam_search(model: CartModel, enc: EncoderStates, q: int, codes: torch.Tensor, beam: int, top_k: int):
    """Plain beam search for query ``q``: Python lists, a fresh teacher-forced forward per beam."""
    one = EncoderStates(enc.layers[:, q : q + 1], enc.mask[q : q + 1])
    depth = codes.shape[1]
    rows = [tuple(r) for r in codes.tolist()]
    prefixes = {r[:l] for r in rows for l in range(depth + 1)}
    beams = [((), 0.0)]
    with torch.no_grad():
        for level in range(depth):
            candidates = []
            for prefix, score in beams:
                padded = torch.tensor([list(prefix) + [0] * (depth - level)])  # causal: padding is unseen
                logp = torch.log_softmax(model.decode(one, padded).logits[level][0], -1)
                for c in range(model.level_sizes[level]):
                    if prefix + (c,) in prefixes:
                        candidates.append((prefix + (c,), score + float(logp[c])))
            beams = sorted(candidates, key=lambda x: -x[1])[:beam]
    return [rows.index(p) for p, _ in beams[:top_k]], [s for _, s in beams[:top_k]]


@pytest.mark.parametrize("trie,beam,top_k", [("random", 3, 2), ("deep", 4, 4), ("full-fanout", 1, 1)])
def test_matches_plain_reference_beam_search(trie: str, beam: int, top_k: int) -> None:
    sizes, codes = TRIES[trie]
    model, enc = tiny_model(sizes, seed=3), random_states(2, seed=1)
    out = constrained_beam_search(model, enc, PrefixIndex.build(codes, sizes), beam=beam, top_k=top_k)
    check_valid(out, codes)
    for q in range(2):
        items, scores = reference_beam_search(model, enc, q, codes, beam, top_k)
        assert_same_ranking(out.items[q], out.scores[q], items, scores)


def test_csr_index_gives_the_same_results() -> None:
    sizes, codes = TRIES["random"]
    model, enc = tiny_model(sizes), random_states(3)
    dense = constrained_beam_search(model, enc, PrefixIndex.build(codes, sizes), beam=5, top_k=5)
    csr_index = PrefixIndex.build(codes, sizes, dense_table_entries=0, dense_mask_bytes=0)
    csr = constrained_beam_search(model, enc, csr_index, beam=5, top_k=5)
    assert torch.equal(dense.items, csr.items) and torch.equal(dense.scores, csr.scores)


def test_beam_wider_than_the_trie_keeps_dead_beams_out() -> None:
    # 3 items, beam 8: most beams are dead at every level; results are the 3 items only
    sizes, codes = (4, 3, 2), torch.tensor([[0, 1, 1], [0, 2, 0], [3, 0, 1]])
    model, enc = tiny_model(sizes), random_states(2)
    out = constrained_beam_search(model, enc, PrefixIndex.build(codes, sizes), beam=8, top_k=3)
    check_valid(out, codes)
    assert sorted(out.items[0].tolist()) == [0, 1, 2]


def test_kv_cache_steps_equal_teacher_forcing() -> None:
    sizes = (3, 4, 2, 3)
    model, enc = tiny_model(sizes), random_states(2)
    g = torch.Generator().manual_seed(0)
    target = torch.stack([torch.randint(0, k, (2, 3), generator=g) for k in sizes], -1)  # (B, W=3, L)
    full = model.decode(enc, target).logits  # (B, W, K_l) per level
    mem = model.memory(enc)
    step = model.step(mem, None, None, 0)
    torch.testing.assert_close(step.logits.expand(-1, 3, -1), full[0], rtol=1e-5, atol=1e-5)
    cache = step.cache.reorder(torch.arange(2).repeat_interleave(3))  # 1 beam -> 3 beams per query
    for level in range(1, len(sizes)):
        step = model.step(mem, cache, target[:, :, level - 1], level)
        torch.testing.assert_close(step.logits, full[level], rtol=1e-5, atol=1e-5)
        cache = step.cache
    # reordering beams reorders their cached histories
    perm = torch.tensor([2, 0, 1, 3, 5, 4])
    s2 = model.step(mem, model.step(mem, None, None, 0).cache.reorder(torch.arange(2).repeat_interleave(3)),
                    target[:, :, 0], 1)
    re = model.step(mem, s2.cache.reorder(perm), target.view(6, -1)[perm].view(2, 3, -1)[:, :, 1], 2)
    torch.testing.assert_close(re.logits.reshape(6, -1), full[2].reshape(6, -1)[perm], rtol=1e-5, atol=1e-5)


def test_unconstrained_equals_constrained_on_the_full_product() -> None:
    sizes, codes = TRIES["full-fanout"]
    model, enc = tiny_model(sizes), random_states(3)
    index = PrefixIndex.build(codes, sizes)
    a = constrained_beam_search(model, enc, index, beam=4, top_k=4)
    b = unconstrained_beam_search(model, enc, beam=4, top_k=4, prefix_index=index)
    assert torch.equal(a.items, b.items) and torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.scores, b.scores)
    c = unconstrained_beam_search(model, enc, beam=4, top_k=4)
    assert (c.items == -1).all() and torch.equal(c.codes, a.codes)


def test_unconstrained_can_leave_the_trie_and_constrained_never_does() -> None:
    sizes = (4, 4, 4)
    codes = random_table(6, sizes, 7)  # a sparse trie: most sequences are invalid
    model, enc = tiny_model(sizes, seed=5), random_states(8, seed=2)
    index = PrefixIndex.build(codes, sizes)
    free = unconstrained_beam_search(model, enc, beam=5, top_k=5, prefix_index=index)
    assert (free.items == -1).any()
    check_valid(constrained_beam_search(model, enc, index, beam=5, top_k=5), codes)


def test_bad_inputs_raise() -> None:
    sizes, codes = TRIES["random"]
    model, enc = tiny_model(sizes), random_states(2)
    index = PrefixIndex.build(codes, sizes)
    with pytest.raises(ValueError, match="beam must be"):
        constrained_beam_search(model, enc, index, beam=0, top_k=1)
    with pytest.raises(ValueError, match="exceeds beam"):
        constrained_beam_search(model, enc, index, beam=2, top_k=3)
    with pytest.raises(ValueError, match="valid identifiers"):
        constrained_beam_search(model, enc, index, beam=30, top_k=21)
    with pytest.raises(ValueError, match="top_k must be"):
        constrained_beam_search(model, enc, index, beam=2, top_k=0)
    empty = EncoderStates(enc.layers[:, :0], enc.mask[:0])
    with pytest.raises(ValueError, match="empty"):
        constrained_beam_search(model, empty, index, beam=2, top_k=1)
    with pytest.raises(ValueError, match="empty"):
        exhaustive_scores(model, empty, codes)
    other = PrefixIndex.build(torch.tensor([[0, 0]]), (3, 4))
    with pytest.raises(ValueError, match="level sizes"):
        constrained_beam_search(model, enc, other, beam=2, top_k=1)
