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

    # the device path (GPU galleries of 10M in seconds): the same identifiers as the NumPy path on the
    # same features, in one chunk or many; its sampler keeps the mixture's cluster weights
    feats = galleries.sample_features_torch(mix, 2_000, seed=4)
    assert feats.shape == (2_000, 24) and torch.allclose(feats.norm(dim=1), torch.ones(2_000), atol=1e-5)
    near = torch.argmax(feats @ torch.nn.functional.normalize(torch.from_numpy(mix.means), dim=1).T, 1)
    assert np.abs(np.bincount(near.numpy(), minlength=3) / 2_000 - mix.weights).max() < 0.05
    want, want_sizes = galleries.identify(model, feats.numpy())
    for chunk in (2_000, 333):
        got, got_sizes = galleries.identify_torch(model, feats, chunk=chunk)
        assert np.array_equal(got.numpy(), want) and got_sizes == want_sizes
    g = galleries.build_gallery_torch(mix, model, 700, seed=5, chunk=256, dtype=torch.float16)
    assert g.features.dtype == torch.float16 and g.features.shape == (700, 24) and g.index.n_items == 700
    codes, sizes = galleries.identify(model, g.features.float().numpy())
    assert sizes == g.level_sizes and len(np.unique(g.codes.numpy(), axis=0)) == 700
    # the fp16 features identify as their fp32 originals did, up to rounding at a boundary
    assert (codes == g.codes.numpy()).all(1).mean() > 0.97

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
    (tmp_path / "results" / "throughput").mkdir(parents=True)
    gpu_check_csv().to_csv(tmp_path / "results" / "throughput" / "throughput_gpu.csv", index=False)
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
    assert "torch" in res.caption and "faiss" in res.caption
    assert pd.read_csv(out / "galleries.csv")["n_candidates"].tolist() == [60, 200]
    # the GPU check's rows: merged into results/throughput/, summarised, drawn as their own panel
    check_gpu_merge(res, out, timings)


def gpu_check_csv() -> pd.DataFrame:
    """A hand-made GPU check CSV: CART flat at 10,000 q/s, exact search 100,000 q/s at N=1,000 falling
    to 1,000 at N=100,000 (crossover at N=10,000 in log-log), batch 1,024; and one row of every other kind."""
    nan = float("nan")
    rows = [{"kind": "machine", "name": "device", "device": "NVIDIA Fake", "note": "NVIDIA Fake"}]
    for n, exact in ((1_000, 1e5), (100_000, 1e3)):
        for system, qps, inp in (("cart_decode", 1e4, "encoded"), ("unconstrained_decode", 1.1e4, "encoded"),
                                 ("dual_tower_exact", exact, "encoded"), ("cart_end_to_end", 5e3, "text")):
            rows.append({"kind": "decode", "name": system, "system": system, "input": inp, "precision": "fp16",
                         "device": "NVIDIA Fake", "n_candidates": n, "batch_size": 1024, "beam": 10, "top_k": 10,
                         "qps": qps, "latency_ms_p50": 1024 / qps * 1e3, "peak_mem_mb": 100.0,
                         "recall_vs_exact": 1.0 if system.startswith("dual") else nan, "note": "median of 5"})
    rows.append({"kind": "decode", "name": "cart_decode", "system": "cart_decode", "input": "encoded",
                 "device": "NVIDIA Fake", "n_candidates": 1_000, "batch_size": 1, "beam": 10, "qps": 300.0})
    rows += [{"kind": "train", "name": "train_texts_per_s", "system": "cart_train", "device": "NVIDIA Fake",
              "batch_size": 512, "value": 25_000.0, "unit": "texts/s"},
             {"kind": "agreement", "name": "top1_identical", "device": "NVIDIA Fake", "value": 0.995,
              "target": 0.99, "passed": True},
             {"kind": "target", "name": "flatness_ratio", "device": "NVIDIA Fake", "value": 1.0, "target": 0.9,
              "passed": True},
             {"kind": "target", "name": "train_texts_per_s_b512", "device": "NVIDIA Fake", "value": 25_000.0,
              "target": 20_000.0, "passed": True}]
    return pd.DataFrame(rows, columns=list(measure.GPU_COLUMNS))


def check_gpu_merge(res, out, timings: dict) -> None:
    given = gpu_check_csv()
    merged = pd.read_csv(out / "gpu_rows.csv")  # stable columns: everything but the clock's
    measured = pd.read_csv(out / "gpu_rows.timings.csv")
    assert len(merged) == len(measured) == len(given) and "qps" not in merged.columns
    assert merged["name"].tolist() == given["name"].tolist() and merged["note"].fillna("").tolist() == \
        given["note"].fillna("").tolist()
    np.testing.assert_allclose(measured["qps"], given["qps"])  # with their labels: which row is which
    assert measured["n_candidates"].dropna().astype(int).tolist() == given["n_candidates"].dropna().astype(int).tolist()
    assert res.gpu is not None and len(res.gpu) == len(given)
    assert timings["gpu_device"] == "NVIDIA Fake" and timings["gpu_top1_identical"] == 0.995
    assert timings["gpu_flatness_ratio_passed"] is True and timings["gpu_panel_batch_size"] == 1024
    assert timings["gpu_crossover_n_candidates"] == 10_000  # hand-made: exact search crosses CART at 10K
    titles = [ax.get_title() for ax in res.figure.axes if ax.get_title()]
    assert len(titles) == 2 and "NVIDIA Fake" in titles[1] and "1,024" in titles[1]
    gpu_ax = [ax for ax in res.figure.axes if "NVIDIA Fake" in ax.get_title()][0]
    labels = [line.get_label() for line in gpu_ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["CART constrained (fp16)", "CART unconstrained (fp16)", "dual tower, exact (fp16)"]
    cart = [line for line in gpu_ax.get_lines() if line.get_label() == "CART constrained (fp16)"][0]
    assert list(cart.get_xdata()) == [1_000, 100_000] and list(cart.get_ydata()) == [1e4, 1e4]  # batch 1,024 only
    assert "NVIDIA Fake" in res.caption and "scripts/gpu_check.py" in res.caption


def test_run_without_gpu_rows_says_so(tmp_path) -> None:
    make_task(tmp_path)
    res = throughput.run(params_from_dict(TINY), tmp_path, progress=False)
    out = tmp_path / "results" / "throughput"
    assert res.gpu is None and "No GPU rows" in res.caption
    titles = [ax.get_title() for ax in res.figure.axes if ax.get_title()]
    assert titles[-1] == "GPU (not measured)"
    texts = [t.get_text() for ax in res.figure.axes for t in ax.texts]
    assert any("throughput_gpu.csv is absent" in t and "gpu_check.py" in t for t in texts)
    for name in ("gpu_rows.csv", "gpu_rows.timings.csv"):  # declared outs: written, with their header only
        frame = pd.read_csv(out / name)
        assert len(frame) == 0 and "kind" in frame.columns
    assert not any(k.startswith("gpu_") for k in json.loads((out / "timings.json").read_text()))
    assert isinstance(throughput.gpu_tables(res.gpu), str)


def test_gpu_rows_of_the_former_script_are_read_as_decode_rows(tmp_path) -> None:
    old = pd.DataFrame([{"system": s, "device": "NVIDIA Old", "n_candidates": 1000, "batch_size": 100, "beam": 10,
                         "qps": 1e3, "latency_ms_p50": 100.0, "peak_mem_mb": 1.0, "recall_vs_exact": float("nan")}
                        for s in ("cart_decode", "cart_end_to_end")], columns=list(measure.COLUMNS))
    old.to_csv(tmp_path / "old.csv", index=False)
    rows = measure.read_gpu_rows(tmp_path / "old.csv")
    assert tuple(rows.columns) == measure.GPU_COLUMNS and set(rows["kind"]) == {"decode"}
    assert rows["input"].tolist() == ["encoded", "text"] and rows["n_candidates"].tolist() == [1000, 1000]
    assert measure.read_gpu_rows(tmp_path / "absent.csv") is None
    pd.DataFrame({"system": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="missing column"):
        measure.read_gpu_rows(tmp_path / "bad.csv")
    table = gpu_check_csv()
    table.loc[0, "kind"] = "nonsense"
    table.to_csv(tmp_path / "kind.csv", index=False)
    with pytest.raises(ValueError, match="unknown row kind"):
        measure.read_gpu_rows(tmp_path / "kind.csv")
    pivot, checks = throughput.gpu_tables(measure.read_gpu_rows(tmp_path / "old.csv"))
    assert pivot.shape == (2, 1) and len(checks) == 0


def test_missing_features_file_names_it_and_the_stage_to_run(tmp_path) -> None:
    make_task(tmp_path, features=False)
    with pytest.raises(FileNotFoundError, match=r"items\.npy.*features"):
        throughput.run(params_from_dict(TINY), tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match=r"dataset.*data"):
        throughput.run(params_from_dict(TINY), tmp_path / "elsewhere", progress=False)
