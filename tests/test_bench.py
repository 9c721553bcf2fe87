"""The throughput benchmark (Figure 4 analogue): the timing harness, the gallery sampler, the
decoder's FLOP count, exact search, and a tiny end-to-end run of the stage. (The decoder itself is
tested in test_decode.py.)"""
from __future__ import annotations

import functools
import itertools
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertModel

from cartlib.baselines import exact_topk, recall_vs_exact
from cartlib.bench import analysis, galleries, measure, queries, timing
from cartlib.config import params_from_dict
from cartlib.data.features import save_features
from cartlib.data.schema import DatasetWriter
from cartlib.decode import BeamDecoder
from cartlib.stages import throughput
from cartlib.ids.prefix import PrefixIndex
from cartlib.model.cart import CartModel, EncoderStates
from cartlib.model.fusion import FusionMode

S, D_ENC, T = 2, 16, 5


@functools.lru_cache(maxsize=None)
def tiny_model(level_sizes: tuple[int, ...], fusion: FusionMode = FusionMode.TWO_BRANCH, seed: int = 0) -> CartModel:
    torch.manual_seed(seed)
    enc = BertModel(BertConfig(vocab_size=30, hidden_size=D_ENC, num_hidden_layers=S, num_attention_heads=2,
                               intermediate_size=32))
    model = CartModel(text_encoder=enc, freeze_encoder=True, level_sizes=level_sizes, d_model=16, n_layers=2,
                      n_heads=2, dropout=0.1, fusion=fusion)
    with torch.no_grad():
        model.head.weight.mul_(8.0)  # peaked distributions: well separated scores
        for layer in model.layers:
            if layer.fusion.fine is not None:  # non-uniform α, so folding it is really tested
                layer.fusion.fine.alpha_logits.normal_()
    return model.eval()


def random_states(b: int, seed: int = 0) -> EncoderStates:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, T, dtype=torch.bool)
    mask[0, 3:] = False  # padding in one query
    return EncoderStates(torch.randn(S, b, T, D_ENC, generator=g), mask)


def random_table(n: int, sizes: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = list(itertools.product(*(range(k) for k in sizes)))
    return torch.tensor([rows[i] for i in torch.randperm(len(rows), generator=g)[:n].tolist()])


def test_bucketed_encoding_equals_one_padded_call_at_real_tokens() -> None:
    model = tiny_model((2, 2, 2))
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 7, 2, 7, 5, 1, 6])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 30, (7, 7), generator=g) * mask
    with torch.inference_mode():
        ref = model.encode(ids, mask)
        out = queries.encode_bucketed(model, ids, mask, bucket=3)
    assert torch.equal(out.mask, ref.mask)
    real = mask.bool()[None, :, :, None].expand_as(ref.layers)
    torch.testing.assert_close(out.layers[real], ref.layers[real], rtol=1e-5, atol=1e-5)  # padding: masked


def test_decoder_flops_match_a_flop_counter() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    sizes = (4, 4, 4)
    for fusion in (FusionMode.TWO_BRANCH, FusionMode.LAST_LAYER):
        model, enc = tiny_model(sizes, fusion), random_states(1)
        enc = EncoderStates(enc.layers, torch.ones_like(enc.mask))
        with FlopCounterMode(display=False) as counter:  # counts every matmul (CPU SDPA it would miss)
            BeamDecoder(model).search(enc, None, beam=3, top_k=3)
        assert analysis.decoder_flops_per_query(model, n_tokens=T, beam=3) == counter.get_total_flops()


# ---------------------------------------------------------------------------- timing harness

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def timed(self, durations):
        it = iter(durations)

        def fn():
            self.now += next(it)
        return fn


_FAULTS_SCRIPT = """
import resource, sys, torch
from cartlib.bench import timing
retained = timing.retain_freed_memory() if sys.argv[1] == "retain" else False
def churn():  # fresh activations, freed right away, above glibc's largest dynamic mmap threshold
    for _ in range(20):
        torch.ones(10 * 2 ** 20)  # 40 MiB
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(retained, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_freed_memory_stops_page_faults_on_every_allocation() -> None:
    """Oracle: the kernel's minor-fault count. 20 fresh 40 MiB blocks fault in 10,240 pages each by
    default (glibc maps and unmaps them); kept in the process they fault in none after warm-up."""
    import subprocess

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])

    retained, with_retain = faults("retain")
    _, without = faults("default")
    if retained != "True":
        pytest.skip("not glibc")
    assert without > 20 * 5000  # each 40 MiB block is page-faulted in anew
    assert with_retain < 200


def test_time_interleaved_reports_medians_without_cuda() -> None:
    clock = FakeClock()
    fns = {"a": clock.timed([9.0, 3.0, 1.0, 2.0]), "b": clock.timed([0.5, 0.1, 0.4, 0.2])}
    res = timing.time_interleaved(fns, batch_size=10, repeats=3, max_batch_seconds=10.0, device="cpu",
                                 memory=timing.PeakMemory("cpu"), clock=clock)
    assert res["a"].warmup_seconds == 9.0 and res["a"].seconds == (3.0, 1.0, 2.0)
    assert res["a"].latency_ms_p50 == pytest.approx(2000.0) and res["a"].qps == pytest.approx(5.0)
    assert res["b"].latency_ms_p50 == pytest.approx(200.0) and res["b"].qps == pytest.approx(50.0)
    assert res["a"].peak_mem_mb > 0 and not res["a"].skipped


def test_time_interleaved_skips_a_slow_warmup_and_named_skips() -> None:
    clock = FakeClock()
    calls = []
    fns = {"slow": clock.timed([11.0]), "fast": clock.timed([1.0, 1.0]),
           "never": lambda: calls.append(1)}
    res = timing.time_interleaved(fns, batch_size=4, repeats=1, max_batch_seconds=10.0, skip={"never": "predicted"},
                                 clock=clock)
    assert math.isnan(res["slow"].qps) and "max_batch_seconds" in res["slow"].skipped
    assert res["fast"].qps == pytest.approx(4.0)
    assert res["never"].skipped == "predicted" and not calls


def test_skips_are_predicted_from_smaller_galleries() -> None:
    history = {("dual_tower_exact", 1_000, 100): 2.0, ("dual_tower_exact", 1_000, 1024): None,
               ("cart_decode", 1_000, 100): 20.0}
    pred = measure.predicted_skips("dual_tower_exact", 100_000, [1, 100, 1024], history, 30.0)
    assert set(pred) == {100, 1024}  # 2 s x 100 (linear in N) > 30 s; batch 1024 was skipped already
    assert "predicted 200 s" in pred[100] and "skipped at N=1,000" in pred[1024]
    assert measure.predicted_skips("cart_decode", 100_000, [100], history, 30.0) == {}  # CART: flat in N


def test_exact_topk_in_chunks_equals_one_matmul() -> None:
    g = torch.Generator().manual_seed(0)
    gallery, queries = torch.randn(10_000, 8, generator=g), torch.randn(5, 8, generator=g)
    idx, scores = exact_topk(queries, gallery, k=10, block_bytes=5 * 4 * 100)  # forces 3 chunks of 4096
    ref_s, ref_i = (queries @ gallery.T).topk(10, dim=1)
    assert torch.equal(idx, ref_i) and torch.equal(scores, ref_s)
    # NumPy in, NumPy out, queries in batches: the same neighbours
    top = exact_topk(queries.numpy(), gallery.numpy(), k=10, batch_size=2, block_bytes=5 * 4 * 100)
    assert isinstance(top.indices, np.ndarray) and np.array_equal(top.indices, ref_i.numpy())
    assert recall_vs_exact(idx.numpy(), ref_i.numpy()) == 1.0
    assert recall_vs_exact(np.array([[1, 2], [3, -1]]), np.array([[2, 1], [3, 4]])) == 0.75


def test_crossover_is_interpolated_in_log_log() -> None:
    rows = []
    for n, cart, exact in ((1_000, 100.0, 1_000.0), (100_000, 100.0, 10.0)):
        rows += [{"system": "cart_decode", "n_candidates": n, "batch_size": 100, "qps": cart},
                 {"system": "dual_tower_exact", "n_candidates": n, "batch_size": 100, "qps": exact}]
    n, qps = analysis.crossover(pd.DataFrame(rows), batch_size=100)
    assert n == pytest.approx(10_000) and qps == pytest.approx(100.0)


# ---------------------------------------------------------------------------- galleries

def test_sampled_gallery_keeps_the_cluster_structure_and_gets_unique_identifiers() -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 24)).astype(np.float32) * 3
    labels = np.repeat(np.arange(3), [50, 30, 20])
    x = centers[labels] + rng.standard_normal((100, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mix = galleries.fit_feature_mixture(x, labels, rank=4)
    np.testing.assert_allclose(mix.weights, [0.5, 0.3, 0.2])
    g = galleries.sample_features(mix, 2_000, seed=1)
    assert g.shape == (2_000, 24) and g.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, rtol=1e-5)
    nearest = np.argmax(g @ (mix.means / np.linalg.norm(mix.means, axis=1, keepdims=True)).T, 1)
    assert np.abs(np.bincount(nearest, minlength=3) / 2_000 - mix.weights).max() < 0.05
    assert np.array_equal(galleries.sample_features(mix, 50, seed=3), galleries.sample_features(mix, 50, seed=3))

    from cartlib.config import IdentifiersConfig

    model = galleries.fit_identifier_model(x, IdentifiersConfig(n_clusters=3, codebook_size=4, epochs=1), seed=0)
    gallery = galleries.build_gallery(mix, model, 500, seed=2)
    assert gallery.codes.shape == (500, 4) and len(np.unique(gallery.codes, axis=0)) == 500
    assert gallery.level_sizes[:3] == (3, 4, 4) and gallery.index.n_items == 500
    codes, sizes = galleries.identify(model, x)  # the fitted table, re-derived from the same items
    assert np.array_equal(codes, model.codes_) and sizes == model.level_sizes_


# ---------------------------------------------------------------------------- the stage, tiny

def make_task(root, *, n: int = 120, d: int = 384, features: bool = True) -> None:
    rng = np.random.default_rng(0)
    words = ["red", "blue", "circle", "square", "small", "large", "left", "right", "top", "bottom"]
    w = DatasetWriter(root / "data" / "image" / "dataset", task="image", dataset="synthetic", n_items=n,
                      media_shape=None, media_dtype=None)
    w.add(item_ids=[f"i{i}" for i in range(n)], splits=["test" if i < n // 3 else "train" for i in range(n)],
          attributes=[{}] * n, captions=[[" ".join(rng.choice(words, 6)) for _ in range(2)] for _ in range(n)],
          pseudo_captions=[[] for _ in range(n)], media_paths=[f"{i}.png" for i in range(n)])
    w.close(qrels_path=root / "data" / "image" / "qrels.tsv")
    if features:
        centers = rng.standard_normal((5, d)).astype(np.float32)
        items = centers[rng.integers(0, 5, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
        items /= np.linalg.norm(items, axis=1, keepdims=True)
        caps = np.repeat(items, 2, 0) + 0.2 * rng.standard_normal((2 * n, d)).astype(np.float32)
        caps /= np.linalg.norm(caps, axis=1, keepdims=True)
        save_features(root / "data" / "image" / "features", items=items, caption_ids=[f"i{i}-c{j}" for i in range(n)
                      for j in range(2)], captions=caps, meta={})


TINY = {"identifiers": {"n_clusters": 4, "codebook_size": 4, "epochs": 1},
        "train": {"d_model": 32, "n_heads": 2, "n_layers": 1},
        "throughput": {"sizes": [60, 200], "batch_sizes": [1, 4], "repeats": 1, "hnsw_max_candidates": 100}}


def test_run_writes_the_contract_files(tmp_path) -> None:
    make_task(tmp_path)
    gpu = pd.DataFrame([{"system": "cart_decode", "device": "NVIDIA Fake", "n_candidates": n, "batch_size": 4,
                         "beam": 10, "qps": 1e4, "latency_ms_p50": 0.4, "peak_mem_mb": 10.0,
                         "recall_vs_exact": float("nan")} for n in (60, 200)])
    (tmp_path / "results" / "throughput").mkdir(parents=True)
    gpu.to_csv(tmp_path / "results" / "throughput" / "throughput_gpu.csv", index=False)
    res = throughput.run(params_from_dict(TINY), tmp_path, progress=False)
    out = tmp_path / "results" / "throughput"
    table = pd.read_csv(out / "throughput.csv")
    assert tuple(table.columns) == measure.COLUMNS
    assert set(table["system"]) == set(measure.SYSTEMS)
    assert set(table.loc[table["system"] == "faiss_hnsw", "n_candidates"]) == {60}  # hnsw_max_candidates
    flat = table[table["system"] == "faiss_flat"]
    assert (flat["recall_vs_exact"] == 1.0).all()
    assert table.loc[table["system"].isin(measure.CART_SYSTEMS), "recall_vs_exact"].isna().all()
    assert (table["qps"] > 0).all() and (table["device"] == f"cpu-{torch.get_num_threads()}core").all()
    metrics = json.loads((out / "metrics.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    for key in ("constraint_overhead_ratio", "flatness_ratio", "crossover_n_candidates", "arithmetic_floor_fraction"):
        assert key in timings and key not in metrics  # derived from wall-clock: timings.json only
    assert not [k for k in metrics if "qps" in k or "second" in k or "ratio" in k and k != "ratio_batch_size"]
    assert metrics["decoder_flops_per_query"] > 0 and metrics["n_candidates_largest"] == 200
    assert timings["flatness_ratio"] > 0 and 0 < timings["arithmetic_floor_fraction"]
    assert (out / "throughput.png").exists() and (out / "throughput.pdf").exists()
    assert len([ax for ax in res.figure.axes if ax.get_title()]) == 2  # this CPU + the GPU rows
    assert "torch" in res.caption and "faiss" in res.caption
    assert pd.read_csv(out / "galleries.csv")["n_candidates"].tolist() == [60, 200]


def test_missing_features_file_names_it_and_the_stage_to_run(tmp_path) -> None:
    make_task(tmp_path, features=False)
    with pytest.raises(FileNotFoundError, match=r"items\.npy.*features"):
        throughput.run(params_from_dict(TINY), tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match=r"dataset.*data"):
        throughput.run(params_from_dict(TINY), tmp_path / "elsewhere", progress=False)


def test_gpu_script_runs_on_a_cpu_without_data_and_appends_the_contract_columns(tmp_path) -> None:
    """scripts/bench_throughput_gpu.py is what the GPU machine runs; CI has no GPU, so check it here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(os.path.dirname(__file__), "..",
                                                                          "scripts", "bench_throughput_gpu.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "gpu.csv"
    argv = [str(out), "--root", str(tmp_path), "--smoke", "--device", "cpu", "--sizes", "100", "300",
            "--batch-sizes", "2", "--repeats", "1"]
    assert script.main(argv) == 0
    assert script.main(argv) == 0  # a second run appends
    table = pd.read_csv(out)
    assert tuple(table.columns) == measure.COLUMNS
    assert {"cart_decode", "unconstrained_decode", "dual_tower_exact"} <= set(table["system"])
    assert not any(s.startswith("faiss") for s in table["system"])  # the GPU machine has no FAISS
    assert sorted(set(table["n_candidates"])) == [100, 300] and (table["batch_size"] == 2).all()
    assert len(table) % 2 == 0 and (table["qps"] > 0).all()
