"""The suite's one beam search (`cartlib.decode`, CART inference) against three oracles: exhaustive
scoring of every valid identifier, the former library decoder (`tests/reference_decoder.py`: the
model's own step, SDPA attention and fusion modules) and a plain search (Python sets, one
teacher-forced forward per beam per level); on tiny random models, every fusion mode.
"""
from __future__ import annotations

import functools
import itertools
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from cartlib.decode import (
    BeamDecoder,
    GenerationOutput,
    LevelState,
    constrained_beam_search,
    decoder_for,
    exhaustive_scores,
    unconstrained_beam_search,
)
from cartlib.ids.prefix import PrefixIndex
from cartlib.model.cart import CartModel, EncoderStates
from cartlib.model.fusion import FusionMode
from reference_decoder import plain_beam_search, reference_beam_search

S, D_ENC, T = 2, 16, 5


@functools.lru_cache(maxsize=None)  # models are only read (eval mode, no gradient)
def tiny_model(level_sizes: tuple[int, ...], *, fusion: bool | FusionMode = True, seed: int = 0) -> CartModel:
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
        for layer in model.layers:
            if layer.fusion.fine is not None:  # non-uniform α, so folding it into the output is tested
                layer.fusion.fine.alpha_logits.normal_()
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


@pytest.mark.parametrize("trie,beam,top_k", [("random", 3, 2), ("deep", 4, 4), ("full-fanout", 1, 1)])
def test_matches_plain_reference_beam_search(trie: str, beam: int, top_k: int) -> None:
    sizes, codes = TRIES[trie]
    model, enc = tiny_model(sizes, seed=3), random_states(2, seed=1)
    out = constrained_beam_search(model, enc, PrefixIndex.build(codes, sizes), beam=beam, top_k=top_k)
    check_valid(out, codes)
    for q in range(2):
        items, scores = plain_beam_search(model, enc, q, codes, beam, top_k)
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


@pytest.mark.parametrize("pack", [True, False])  # encoder-side keys/values of real tokens only, or of all
@pytest.mark.parametrize("fusion", list(FusionMode))
@pytest.mark.parametrize("trie", ["shared-prefix", "random", "deep"])
def test_equals_the_reference_decoder(trie: str, fusion: FusionMode, pack: bool) -> None:
    sizes, codes = TRIES[trie]
    model, enc = tiny_model(sizes, fusion=fusion), random_states(4)
    index = PrefixIndex.build(codes, sizes)
    dec = BeamDecoder(model)
    dec.PACK_BELOW = 1.0 if pack else 0.0
    for beam, top_k in ((3, 2), (4, 4)):
        ref = reference_beam_search(model, enc, index, beam=beam, top_k=top_k)
        out = dec.search(enc, index, beam=beam, top_k=top_k)
        torch.testing.assert_close(out.scores, ref.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.items, ref.items) and torch.equal(out.codes, ref.codes)  # no near-ties here
        free_ref = reference_beam_search(model, enc, None, beam=beam, top_k=top_k)
        free = dec.search(enc, None, beam=beam, top_k=top_k)
        torch.testing.assert_close(free.scores, free_ref.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(free.codes, free_ref.codes) and (free.items == -1).all()


def test_on_level_hook_sees_what_each_level_chose() -> None:
    sizes, codes = TRIES["deep"]
    model, enc = tiny_model(sizes, seed=3), random_states(3, seed=1)
    index = PrefixIndex.build(codes, sizes)
    seen: list[LevelState] = []
    out = constrained_beam_search(model, enc, index, beam=4, top_k=4, on_level=seen.append)
    assert [s.level for s in seen] == list(range(len(sizes)))
    for s in seen:
        b, w, k = s.log_probs.shape
        assert s.prefixes.shape == (b, w, s.level) and k == sizes[s.level]
        ok = torch.isfinite(s.scores)
        # every kept candidate is a valid extension, scored prefix + log p(code)
        rows = torch.arange(b)[:, None].expand_as(s.parents)
        assert s.allowed[rows, s.parents, s.codes][ok].all()
        want = s.prefix_scores.gather(1, s.parents) + s.log_probs[rows, s.parents, s.codes]
        torch.testing.assert_close(s.scores[ok], want[ok])
        # the constraint removed exactly the invalid codes of live beams (oracle: Python prefix sets)
        valid = {tuple(r[: s.level + 1]) for r in codes.tolist()}
        for q in range(b):
            for j in range(w):
                if not math.isfinite(float(s.prefix_scores[q, j])):
                    continue
                prefix = tuple(s.prefixes[q, j].tolist())
                for c in range(k):
                    assert bool(s.removed[q, j, c]) == (prefix + (c,) not in valid)
    last = seen[-1]
    torch.testing.assert_close(last.scores[:, :4], out.scores)
    # without the hook: the same result
    again = constrained_beam_search(model, enc, index, beam=4, top_k=4)
    assert torch.equal(again.items, out.items) and torch.equal(again.scores, out.scores)


def test_decoder_is_reused_until_a_weight_changes() -> None:
    sizes, codes = TRIES["random"]
    torch.manual_seed(0)
    model = tiny_model(sizes, seed=7)
    model = CartModel(text_encoder=model.encoder, freeze_encoder=True, level_sizes=sizes, d_model=16, n_layers=1,
                      n_heads=2, fusion=True).eval()
    enc, index = random_states(2), PrefixIndex.build(codes, sizes)
    first = decoder_for(model)
    assert decoder_for(model) is first
    before = constrained_beam_search(model, enc, index, beam=5, top_k=5)
    with torch.no_grad():  # an optimiser step in place, as training does between validations
        for layer in model.layers:
            layer.fusion.fine.alpha_logits.normal_()
            layer.fusion.fine.o_weight.mul_(3.0)
        model.head.weight.mul_(5.0)
    assert decoder_for(model) is not first
    after = constrained_beam_search(model, enc, index, beam=5, top_k=5)
    ref = reference_beam_search(model, enc, index, beam=5, top_k=5)
    torch.testing.assert_close(after.scores, ref.scores, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after.scores, before.scores)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        constrained_beam_search(model, enc, index, beam=5, top_k=5)


# ---------------------------------------------------------------------------- precision (fp16 on CUDA)

from cartlib.bench.timing import HostSyncRecorder as SyncRecorder, level_loop_syncs  # noqa: E402
from cartlib.decode import Precision, default_precision  # noqa: E402

# reduced-precision tolerance on a summed log-probability (|logits| up to ~30 in these peaked models)
TOL = {Precision.FP16: 0.06, Precision.BF16: 0.4}


def assert_close_ranking(out: GenerationOutput, ref: GenerationOutput, tol: float) -> None:
    """Scores within ``tol`` of the fp32 reference; the same item wherever the reference's scores
    around it are separated by more than 2·tol (no near-tie the rounding could flip)."""
    assert out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, ref.scores, rtol=0, atol=tol)
    s = ref.scores
    gap = torch.full_like(s, math.inf)
    gap[:, 1:] = torch.minimum(gap[:, 1:], s[:, :-1] - s[:, 1:])
    gap[:, :-1] = torch.minimum(gap[:, :-1], s[:, :-1] - s[:, 1:])
    clear = gap > 2 * tol
    assert clear.any()  # the test would be empty otherwise
    assert torch.equal(out.items[clear], ref.items[clear])


@pytest.mark.parametrize("precision", [Precision.FP16, Precision.BF16])
@pytest.mark.parametrize("fusion", list(FusionMode))
def test_reduced_precision_search_matches_fp32_within_rounding(fusion: FusionMode, precision: Precision) -> None:
    """The fp16 path that CUDA runs, on the CPU: weights and matmuls in half precision, softmaxes and
    beam scores in float32. Oracle: the fp32 reference decoder and teacher-forced exhaustive scores."""
    sizes, codes = TRIES["random"]
    model, enc = tiny_model(sizes, fusion=fusion), random_states(6, seed=4)
    index = PrefixIndex.build(codes, sizes)
    n = codes.shape[0]
    full = exhaustive_scores(model, enc, codes)  # (B, N) fp32 teacher forcing
    exact = BeamDecoder(model).search(enc, index, beam=n, top_k=n)  # beam >= N: no pruning, a pure sort
    for pack in (True, False):
        dec = BeamDecoder(model, precision=precision)
        dec.PACK_BELOW = 1.0 if pack else 0.0
        assert dec.dtype == precision.dtype and dec.layers[0].qkv[0].dtype == precision.dtype
        assert_close_ranking(dec.search(enc, index, beam=n, top_k=n), exact, TOL[precision])
        # a pruning beam: valid identifiers whose scores are their fp32 log-probabilities, up to rounding
        out = dec.search(enc, index, beam=5, top_k=5)
        check_valid(out, codes)
        torch.testing.assert_close(out.scores, full.gather(1, out.items), rtol=0, atol=TOL[precision])
        free = dec.search(enc, None, beam=5, top_k=5)
        b = free.codes.shape[0]
        tf = exhaustive_scores(model, enc, free.codes.reshape(b * 5, -1)).view(b, b, 5)  # every query x every code
        torch.testing.assert_close(free.scores, tf[torch.arange(b), torch.arange(b)], rtol=0, atol=TOL[precision])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model is never cast


def test_precision_is_chosen_by_device_and_decoders_are_cached_per_precision() -> None:
    assert default_precision("cpu") is Precision.FP32
    assert default_precision(torch.device("cuda")) is Precision.FP16
    assert default_precision("cuda:1") is Precision.FP16
    assert Precision.of("bf16") is Precision.BF16 and Precision.of(torch.float16) is Precision.FP16
    with pytest.raises(ValueError, match="unknown decoding precision"):
        Precision.of("int8")
    sizes, codes = TRIES["deep"]
    model, enc = tiny_model(sizes, seed=11), random_states(3)
    index = PrefixIndex.build(codes, sizes)
    a = decoder_for(model)
    assert a.precision is Precision.FP32 and decoder_for(model, "fp32") is a
    b = decoder_for(model, "bf16")
    assert b is not a and b.precision is Precision.BF16 and decoder_for(model, Precision.BF16) is b
    exact = constrained_beam_search(model, enc, index, beam=4, top_k=4)
    assert torch.equal(exact.scores, reference_beam_search(model, enc, index, beam=4, top_k=4).scores) or \
        torch.allclose(exact.scores, reference_beam_search(model, enc, index, beam=4, top_k=4).scores, atol=1e-5)
    half = constrained_beam_search(model, enc, index, beam=4, top_k=4, precision="bf16")
    assert half.scores.dtype == torch.float32 and not torch.equal(half.scores, exact.scores)  # really bf16
    torch.testing.assert_close(half.scores, exact.scores, rtol=0, atol=TOL[Precision.BF16])


class _FakeTokenizer:
    """Ids = word lengths (1..29); enough for the tiny encoder (vocab 30)."""

    def __call__(self, texts, padding=True, truncation=True, max_length=8, return_tensors="pt"):
        from transformers import BatchEncoding

        rows = [[min(len(w), 29) for w in t.split()][:max_length] for t in texts]
        t = max(map(len, rows))
        ids = torch.tensor([r + [0] * (t - len(r)) for r in rows])
        return BatchEncoding({"input_ids": ids, "attention_mask": (ids > 0).long()})


def test_evaluate_decodes_at_the_device_precision(monkeypatch) -> None:
    """evaluate's one branch: default_precision(model.device), fp32 on this CPU (exact: the same
    rankings as a plain fp32 search); what it picks is what decoding uses (here forced to bf16)."""
    from cartlib import ranking as evaluate  # the evaluate stage's decode_texts lives in cartlib.ranking

    sizes, codes = TRIES["random"]
    torch.manual_seed(0)
    model = CartModel(text_encoder=tiny_model(sizes).encoder, freeze_encoder=True, level_sizes=sizes, d_model=16,
                      n_layers=1, n_heads=2, fusion=True).eval()
    index = PrefixIndex.build(codes, sizes)
    texts = ["a red circle", "two big blue squares left", "tiny", "a long row of green stars at the top"]
    r = evaluate.decode_texts(model, _FakeTokenizer(), texts, index, beam=5, top_k=3, batch_size=2, max_length=8)
    assert set(model.__dict__["_beam_decoders"]) == {Precision.FP32}
    enc = model.encode(*_FakeTokenizer()(texts).values())
    want = constrained_beam_search(model, enc, index, beam=5, top_k=3)
    assert np.array_equal(r.items, want.items.numpy())
    seen = []
    monkeypatch.setattr(evaluate, "default_precision", lambda device: seen.append(str(device)) or Precision.BF16)
    r16 = evaluate.decode_texts(model, _FakeTokenizer(), texts, index, beam=5, top_k=3, batch_size=2, max_length=8)
    assert seen and seen[0] == "cpu" and Precision.BF16 in model.__dict__["_beam_decoders"]
    np.testing.assert_allclose(r16.scores, r.scores, atol=TOL[Precision.BF16])


# ---------------------------------------------------------------------------- no host sync in the level loop

def test_sync_recorder_catches_host_syncs() -> None:
    """The oracle checks itself: each of these reads a value or a data-dependent shape back."""
    x = torch.arange(6.0) - 2
    cases = [lambda: x.sum().item(), lambda: bool((x > 0).any()), lambda: x[x > 0], lambda: x.nonzero(),
             lambda: float(x.max()), lambda: torch.unique(x)]
    for fn in cases:
        with SyncRecorder() as rec:
            fn()
        assert rec.syncs, fn
    with SyncRecorder() as rec:  # what the level loop does instead
        torch.where(x > 0, x, 0).topk(2)
        x.masked_fill(x < 0, -math.inf).gather(0, torch.tensor([1, 2]))
    assert rec.syncs == []

    class Syncing(BeamDecoder):  # a step that branches on a tensor value: must be caught in the loop
        def step(self, *a, **kw):
            logits, cache = super().step(*a, **kw)
            return (logits * 2 if bool(logits.isnan().any()) else logits), cache

    sizes, codes = TRIES["random"]
    _, levels = level_loop_syncs(Syncing(tiny_model(sizes)), random_states(2), PrefixIndex.build(codes, sizes),
                                 beam=3, top_k=3)
    assert levels and len(levels) == len(sizes)  # once per level


@pytest.mark.parametrize("csr", [False, True])
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_level_loop_never_syncs_the_host(csr: bool, precision: Precision) -> None:
    sizes, codes = TRIES["deep"]
    model, enc = tiny_model(sizes, seed=2), random_states(3)
    kw = {"dense_table_entries": 0, "dense_mask_bytes": 0} if csr else {}
    index = PrefixIndex.build(codes, sizes, **kw)
    for pack in (True, False):
        dec = BeamDecoder(model, precision=precision)
        dec.PACK_BELOW = 1.0 if pack else 0.0
        for idx in (index, None):  # constrained, unconstrained
            memory, levels = level_loop_syncs(dec, enc, idx, beam=4, top_k=4)
            assert levels == [] and memory == ["nonzero"]  # one per search, before the loop
        assert "memory" not in dec.__dict__  # the decoder is left as it was


def test_compiled_step_gives_the_same_search() -> None:
    """``compile_step`` (measured on GPUs by scripts/gpu_check.py) runs the same step through
    torch.compile; the eager backend keeps this CPU test fast."""
    sizes, codes = TRIES["shared-prefix"]
    model, enc = tiny_model(sizes), random_states(2)
    index = PrefixIndex.build(codes, sizes)
    ref = BeamDecoder(model).search(enc, index, beam=3, top_k=3)
    out = BeamDecoder(model, compile_step={"backend": "eager"}).search(enc, index, beam=3, top_k=3)
    assert torch.equal(out.items, ref.items)
    torch.testing.assert_close(out.scores, ref.scores)
