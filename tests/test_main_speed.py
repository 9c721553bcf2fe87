"""The main table's like-for-like queries/s (`cartlib.bench.main_speed`): every system on the same
batches, timed with and without query encoding, producing the ranked lists of the real run (CART:
the evaluate stage's decode; dual tower and FAISS: brute force and the baselines stage's search).
Tiny random BERT (as CART's encoder and as the dual tower's "MiniLM"), tiny random features."""
from __future__ import annotations

import functools
import itertools
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BatchEncoding, BertConfig, BertModel

from cartlib import results, tracking
from cartlib.baselines import faiss_indexes
from cartlib.bench import main_speed as ms
from cartlib.config import BaselinesConfig, EvaluateConfig, Params
from cartlib.encoders.text import encode_sentences
from cartlib.ids.prefix import PrefixIndex
from cartlib.model.cart import CartModel
from cartlib.paths import task_paths
from cartlib.stages import evaluate
from cartlib.stages.baselines import pseudo_caption_scores, top_k_of

D = 16  # the tiny encoder's width = the features' dimension (the built-in benchmark: MiniLM's 384)
SIZES = (3, 4)  # 12 identifiers = 12 gallery items
N = 12
TEXTS = ["a red circle", "two big blue squares on the left", "tiny", "a long row of green stars at the very top",
         "one", "three small yellow triangles", "grey noise burst then a click", "a dog",
         "wide video of a turning cube", "low hum", "bright flash"]
CFG = EvaluateConfig(beam=5, top_k=3, batch_size=4, speed_repeats=2)
BASELINES = BaselinesConfig(ivf_nlist=4, ivf_nprobe=1, hnsw_m=8, hnsw_ef_search=16, fusion_weight=0.5)


class FakeTokenizer:
    """Ids = word lengths (1..29): enough for the tiny encoder (vocab 30)."""

    def __call__(self, texts, padding=True, truncation=True, max_length=8, return_tensors="pt"):
        rows = [[min(len(w), 29) for w in t.split()][:max_length] for t in texts]
        t = max(map(len, rows))
        ids = torch.tensor([r + [0] * (t - len(r)) for r in rows])
        return BatchEncoding({"input_ids": ids, "attention_mask": (ids > 0).long()})


@functools.lru_cache(maxsize=None)  # only read: eval mode, no gradient
def tiny_model() -> CartModel:
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=30, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32))
    model = CartModel(text_encoder=enc, freeze_encoder=True, level_sizes=SIZES, d_model=16, n_layers=1, n_heads=2,
                      fusion=True)
    with torch.no_grad():
        model.head.weight.mul_(8.0)  # peaked distributions: well separated scores
    return model.eval()


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def task_inputs():
    """Gallery features, the queries' pre-encoded vectors, the prefix index, pseudo-captions (two per
    item for all but the last two items)."""
    rng = np.random.default_rng(0)
    items = unit(rng.normal(size=(N, D)))
    queries = unit(rng.normal(size=(len(TEXTS), D)))
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))  # the same index on every call
    codes = torch.tensor(list(itertools.product(*(range(k) for k in SIZES))))[perm]
    index = PrefixIndex.build(codes, SIZES)
    pseudo_texts = [f"pseudo caption {i} take {'x' * (j + 1)}" for i in range(N - 2) for j in range(2)]
    owner = np.repeat(np.arange(N - 2), 2)
    return items, queries, index, pseudo_texts, owner


def run_main(*, features_from_minilm: bool = True, evaluate_cfg: EvaluateConfig = CFG, on_batch=None):
    model = tiny_model()
    items, queries, index, pseudo_texts, owner = task_inputs()
    return ms.main_table_speed(texts=TEXTS, model=model, tokenizer=FakeTokenizer(), index=index,
                               evaluate=evaluate_cfg, max_length=8, items=items, query_vectors=queries,
                               baselines=BASELINES, seed=0, device="cpu",
                               text_encoder=(FakeTokenizer(), model.encoder), features_from_minilm=features_from_minilm,
                               pseudo_texts=pseudo_texts, pseudo_owner=owner, on_batch=on_batch)


def brute_force(q: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q.astype(np.float64) @ items.T.astype(np.float64)), axis=1, kind="stable")[:, :k]


def test_every_system_is_timed_with_and_without_encoding():
    out = run_main()
    table = out.table
    assert list(table.columns) == list(ms.LABELS + ms.RATES)
    assert tuple(table["system"]) == ms.SYSTEMS
    for rate in ms.RATES:
        assert (table[rate] > 0).all() and np.isfinite(table[rate]).all(), rate
    first = table.iloc[0]
    assert (first["batch_size"], first["n_queries"], first["n_candidates"], first["top_k"], first["repeats"]) == \
        (4, len(TEXTS), N, 3, 2)
    assert set(table["device"]) == {"cpu"}
    assert all(len(p) == CFG.speed_repeats for p in out.passes.values())
    assert "batches of 4" in ms.caption(table) and ms.caption(table) == ms.caption(run_main().table)  # labels only


def test_rates_are_queries_over_the_summed_laps_of_a_pass():
    """A clock that ticks 1 s per read: per batch, encode = 1 s and search = 1 s (3 batches); the
    dual-tower systems share one encoder lap per batch."""
    ticks = itertools.count()
    model = tiny_model()
    items, queries, index, pseudo_texts, owner = task_inputs()
    calls = []
    minilm = ms.sentence_encoder(FakeTokenizer(), model.encoder, device="cpu")
    pvec = encode_sentences(pseudo_texts, tokenizer=FakeTokenizer(), model=model.encoder)
    systems = [ms.cart_system(model=model, tokenizer=FakeTokenizer(), index=index, beam=5, top_k=3, max_length=8)]
    systems += ms.dual_tower_systems(items=items, query_vectors=queries, top_k=3, baselines=BASELINES, seed=0,
                                     device="cpu", encoder=lambda texts: calls.append(texts) or minilm(texts),
                                     pseudo_vectors=pvec, pseudo_owner=owner)
    bare = ms.dual_tower_systems(items=items, query_vectors=queries, top_k=3, baselines=BASELINES, seed=0,
                                 device="cpu")[0]  # no encoder: from the pre-encoded vectors
    systems.append(bare._replace(name="exact_pre_encoded"))
    out = ms.measure(systems, texts=TEXTS, batch_size=4, repeats=3, device="cpu", n_candidates=N, top_k=3,
                     clock=lambda: float(next(ticks)))
    t = out.table.set_index("system")
    assert len(out.batches) == 3 and len(calls) == 1 + 3 * 3  # once per batch for all five dual-tower systems
    for name in ms.SYSTEMS:
        assert t.loc[name, "queries_per_second_with_encoding"] == round(len(TEXTS) / 6, 1), name
        assert t.loc[name, "queries_per_second_without_encoding"] == round(len(TEXTS) / 3, 1), name
        assert out.passes[name] == (ms.PassTiming(3.0, 3.0),) * 3
    assert math.isnan(t.loc["exact_pre_encoded", "queries_per_second_with_encoding"])
    assert t.loc["exact_pre_encoded", "queries_per_second_without_encoding"] == round(len(TEXTS) / 3, 1)


def test_every_system_runs_the_same_batches():
    seen: dict[tuple[str, int], list[list[int]]] = {}
    out = run_main(on_batch=lambda system, pass_no, pos: seen.setdefault((system, pass_no), []).append(pos.tolist()))
    want = [b.tolist() for b in ms.query_batches(TEXTS, CFG.batch_size)]
    assert [b.tolist() for b in out.batches] == want
    # the length-sorted queries in batches of batch_size, every query once
    assert sorted(itertools.chain(*want)) == list(range(len(TEXTS))) and [len(b) for b in want] == [4, 4, 3]
    lengths = [len(TEXTS[i]) for i in itertools.chain(*want)]
    assert lengths == sorted(lengths)
    assert {s for s, _ in seen} == set(ms.SYSTEMS)
    for system in ms.SYSTEMS:
        assert seen[(system, -1)] == want[:1]  # one warm-up batch
        for r in range(CFG.speed_repeats):
            assert seen[(system, r)] == want, (system, r)


def test_cart_lists_are_the_evaluate_stage_ranking():
    out = run_main()
    model = tiny_model()
    index = task_inputs()[2]
    r = evaluate.decode_texts(model, FakeTokenizer(), TEXTS, index, beam=CFG.beam, top_k=CFG.top_k,
                              batch_size=CFG.batch_size, max_length=8)
    assert np.array_equal(out.ranked["cart"].items, r.items)
    assert np.array_equal(out.ranked["cart"].scores, r.scores)  # the same decoder, batches and precision


def test_dual_tower_lists_match_brute_force_and_the_baselines_search():
    items, queries, _, pseudo_texts, owner = task_inputs()
    k = CFG.top_k
    # from the pre-encoded vectors (no encoder): the baselines stage's inputs and searches
    model = tiny_model()
    pvec = encode_sentences(pseudo_texts, tokenizer=FakeTokenizer(), model=model.encoder)
    pq = encode_sentences(TEXTS, tokenizer=FakeTokenizer(), model=model.encoder)
    out = run_main(features_from_minilm=False)
    t = out.table.set_index("system")
    assert t.drop(index="cart")["queries_per_second_with_encoding"].isna().all()
    assert (t["queries_per_second_without_encoding"] > 0).all()
    assert t.loc["faiss_flat", "query_encoder"].startswith("none")
    assert "from them only" in ms.caption(out.table)
    oracle = brute_force(queries, items, k)
    assert np.array_equal(out.ranked["dual_tower_exact"].items, oracle)
    assert np.array_equal(out.ranked["faiss_flat"].items, oracle)
    np.testing.assert_allclose(out.ranked["dual_tower_exact"].scores,
                               np.take_along_axis(queries @ items.T, oracle, 1), rtol=1e-5, atol=1e-6)
    for name, index in faiss_indexes(items, BASELINES, 0).items():  # the baselines stage: all queries at once
        scores, found = index.search(queries, k)
        assert np.array_equal(out.ranked[name].items, found), name
    fused, _ = top_k_of(0.5 * (queries @ items.T) + 0.5 * pseudo_caption_scores(pq, pvec, owner, N), k)
    assert np.array_equal(out.ranked["pseudo_caption_fused"].items, fused)

    # with the encoder: the search runs on the vectors it just encoded, batch by batch
    out = run_main(features_from_minilm=True)
    enc = ms.sentence_encoder(FakeTokenizer(), model.encoder, device="cpu")
    fresh = np.zeros((len(TEXTS), D), np.float32)
    with torch.inference_mode():
        for pos in out.batches:
            fresh[pos] = enc([TEXTS[i] for i in pos]).numpy()
    oracle = brute_force(fresh, items, k)
    for name in ("dual_tower_exact", "faiss_flat"):
        assert np.array_equal(out.ranked[name].items, oracle), name
    fused, _ = top_k_of(0.5 * (fresh @ items.T) + 0.5 * pseudo_caption_scores(fresh, pvec, owner, N), k)
    assert np.array_equal(out.ranked["pseudo_caption_fused"].items, fused)


def test_sentence_encoder_gives_the_features_vectors():
    """The dual tower's query encoder = encode_sentences (what made the features' query vectors)."""
    model = tiny_model().encoder
    with torch.inference_mode():
        got = ms.sentence_encoder(FakeTokenizer(), model, device="cpu")(TEXTS).numpy()
    want = encode_sentences(TEXTS, tokenizer=FakeTokenizer(), model=model)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "4", None])
def test_a_bad_batch_size_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"evaluate\.batch_size .*positive integer"):
        ms.query_batches(TEXTS, bad)
    with pytest.raises(ValueError, match=r"evaluate\.batch_size"):
        run_main(evaluate_cfg=EvaluateConfig(beam=5, top_k=3, batch_size=bad, speed_repeats=1))


def test_bad_repeats_and_missing_encoder_are_clear_errors():
    with pytest.raises(ValueError, match=r"evaluate\.speed_repeats"):
        run_main(evaluate_cfg=EvaluateConfig(beam=5, top_k=3, batch_size=4, speed_repeats=0))
    items, queries, index, pseudo_texts, owner = task_inputs()
    with pytest.raises(ValueError, match="MiniLM"):
        ms.main_table_speed(texts=TEXTS, model=tiny_model(), tokenizer=FakeTokenizer(), index=index, evaluate=CFG,
                            max_length=8, items=items, query_vectors=queries, baselines=BASELINES, seed=0,
                            device="cpu", text_encoder=None, features_from_minilm=True)


def test_columns_split_into_speed_tsv_and_speed_timings_tsv(tmp_path, monkeypatch):
    table = run_main(evaluate_cfg=EvaluateConfig(beam=5, top_k=3, batch_size=4, speed_repeats=1)).table
    stable, measured = results.split_table(table)
    assert list(stable.columns) == list(ms.LABELS)
    assert list(measured.columns) == list(ms.LABELS + ms.RATES)
    monkeypatch.setattr(tracking, "log_run", lambda **kw: "run-id")
    paths = task_paths(tmp_path, "image")
    results.publish(paths, "evaluate", params=Params(), metrics={"recall_at_1": 0.5}, tables={"speed": table})
    out = paths.results("evaluate")
    assert pd.read_csv(out / "speed.tsv", sep="\t").columns.tolist() == list(ms.LABELS)
    timings = pd.read_csv(out / "speed.timings.tsv", sep="\t")
    assert timings.columns.tolist() == list(ms.LABELS + ms.RATES)
    assert timings["system"].tolist() == list(ms.SYSTEMS)
