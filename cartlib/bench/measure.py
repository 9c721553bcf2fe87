"""One gallery of the throughput benchmark: every system timed at every batch size (CART, Fang et
al., ACL 2025, Figure 4 analogue).

Systems (the ``system`` column of ``throughput.csv``):

- ``cart_end_to_end``: MiniLM query encoding (pre-tokenised ids, so CPU and GPU rows compare;
  tokenising costs ~0.1 ms/query on a CPU; the batch encoded in length buckets,
  :func:`~cartlib.bench.queries.encode_bucketed`) + constrained beam search;
- ``cart_decode``: constrained beam search (:class:`cartlib.decode.BeamDecoder`, the one decoder of
  the suite) from precomputed encoder states (encoder-side keys/values included);
- ``unconstrained_decode``: the same search without the prefix constraint (the decoding floor);
- ``dual_tower_exact``: exact inner-product top-k by torch matmul over the (N, D) features
  (:func:`cartlib.baselines.exact_topk`), in the same dtype as CART (fp32 on CPU, fp16 on GPU);
- ``faiss_flat``, ``faiss_ivf``, ``faiss_hnsw``: :func:`cartlib.baselines.calibrated_faiss_index`
  (HNSW only up to ``throughput.hnsw_max_candidates``). ``recall_vs_exact`` is the top-10 overlap
  with exact search (1.0 for exact search, empty for CART).

The query encoder is the same MiniLM for every system: dual-tower systems start from the
precomputed caption features, exactly as ``cart_decode`` starts from precomputed encoder states,
so ``cart_decode`` vs ``dual_tower_exact`` is the like-for-like comparison (and the crossover).

A combination whose warm-up exceeds ``max_batch_seconds`` is skipped (recorded with an empty qps,
reason in ``skipped``); so is one predicted to exceed it from a measured smaller gallery
(linear-scan systems) or one whose smaller batch was skipped.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, NamedTuple, Sequence

import torch

from cartlib.baselines import SCORE_BLOCK_BYTES, calibrated_faiss_index, exact_topk
from cartlib.bench.galleries import Gallery
from cartlib.bench.queries import QuerySet, encode_bucketed
from cartlib.bench.timing import PeakMemory, Timing, time_interleaved
from cartlib.decode import BeamDecoder
from cartlib.model.cart import CartModel, EncoderStates

__all__ = ["SYSTEMS", "CART_SYSTEMS", "FAISS_SYSTEMS", "COLUMNS", "GPU_COLUMNS", "GPU_KINDS", "GPU_DECODE_SYSTEMS",
           "RECALL_QUERIES", "Decoder", "random_decoder", "GalleryResult", "predicted_skips", "measure_gallery",
           "read_gpu_rows"]

SYSTEMS = ("cart_end_to_end", "cart_decode", "unconstrained_decode", "dual_tower_exact",
           "faiss_flat", "faiss_ivf", "faiss_hnsw")
CART_SYSTEMS = SYSTEMS[:3]
FAISS_SYSTEMS = SYSTEMS[4:]
COLUMNS = ("system", "device", "n_candidates", "batch_size", "beam", "qps", "latency_ms_p50", "peak_mem_mb",
           "recall_vs_exact")
# the GPU check's CSV (scripts/gpu_check.py -> results/throughput/throughput_gpu.csv): COLUMNS and more; the
# ``kind`` of a row says what it holds (see the script's docstring), ``input`` is "encoded" or "text"
GPU_COLUMNS = ("kind", "name", "system", "input", "precision", "device", "n_candidates", "batch_size", "beam", "top_k",
               "qps", "latency_ms_p50", "peak_mem_mb", "recall_vs_exact", "value", "unit", "target", "passed", "note")
GPU_KINDS = ("machine", "train", "decode", "decode_compile", "agreement", "check", "target")
GPU_DECODE_SYSTEMS = ("cart_decode", "unconstrained_decode", "cart_end_to_end", "dual_tower_exact",
                      "dual_tower_end_to_end")
_GPU_INTS = ("n_candidates", "batch_size", "beam", "top_k")
RECALL_QUERIES = 1000  # queries scored for recall_vs_exact and the FAISS calibration
# how a system's cost grows with N at a fixed batch (for predicting a skip from a smaller gallery)
_N_EXPONENT = {"dual_tower_exact": 1.0, "faiss_flat": 1.0, "faiss_ivf": 0.5}


class Decoder(NamedTuple):
    """A CART model for one gallery's level sizes, with its beam decoder."""

    model: CartModel
    beam: BeamDecoder
    weights: str  # where the decoder weights come from (caption and galleries.csv)


def random_decoder(text_encoder, level_sizes: Sequence[int], train_cfg, *, seed: int, device: str | torch.device,
                   dtype: torch.dtype, weights: str) -> Decoder:
    """A CART model of ``train_cfg`` (an :class:`~cartlib.config.TrainConfig`) with random decoder
    weights around ``text_encoder`` (shared, frozen); throughput does not depend on the weights."""
    torch.manual_seed(seed)
    model = CartModel(text_encoder=text_encoder, freeze_encoder=True, level_sizes=level_sizes,
                      d_model=train_cfg.d_model, n_layers=train_cfg.n_layers, n_heads=train_cfg.n_heads,
                      dropout=train_cfg.dropout, fusion=train_cfg.fusion)
    model = model.to(device=device, dtype=dtype).eval()
    return Decoder(model, BeamDecoder(model), weights)


class GalleryResult(NamedTuple):
    rows: list[dict]  # COLUMNS, one per (system, batch) (skipped: qps etc. NaN)
    skipped: list[dict]  # system, n_candidates, batch_size, reason
    info: dict  # gallery facts: level sizes, decoder weights, build seconds, FAISS settings
    warmups: dict  # (system, N, batch) -> warm-up seconds, None if skipped (predicts skips at larger N)


def predicted_skips(system: str, n: int, batch_sizes: Sequence[int], history: Mapping, max_seconds: float) -> dict:
    """Skips known before running: the same batch was skipped at a smaller N, a smaller batch was
    skipped at this N's predecessor, or a linear/√N-scan system is predicted over the limit."""
    out = {}
    for b in batch_sizes:
        for (sys_, n_prev, b_prev), warm in history.items():
            if sys_ != system or n_prev > n:
                continue
            if warm is None and b_prev <= b:
                out[b] = f"skipped at N={n_prev:,}, batch {b_prev} already"
                break
            if warm is not None and b_prev == b and n_prev < n and system in _N_EXPONENT:
                pred = warm * (n / n_prev) ** _N_EXPONENT[system]
                if pred > max_seconds:
                    out[b] = f"predicted {pred:.0f} s per batch from N={n_prev:,} > max_batch_seconds={max_seconds:g}"
                    break
    return out


class _no_bar:
    """Stands in for tqdm where it is not installed."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> "_no_bar":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


def measure_gallery(gallery: Gallery, *, decoder: Decoder, queries: QuerySet, states: Mapping[int, EncoderStates],
                    cfg, device: str | torch.device, dtype: torch.dtype, device_label: str,
                    systems: Sequence[str] = SYSTEMS, hnsw_m: int = 32, seed: int = 0,
                    history: Mapping | None = None, memory: PeakMemory | None = None,
                    progress: bool = False) -> GalleryResult:
    """Time every system of ``systems`` on ``gallery`` at every batch size of ``cfg`` (a
    :class:`~cartlib.config.ThroughputConfig`); ``states[B]``: the first B queries' encoder states
    under ``decoder``'s encoder. Systems are timed in groups that share what they build (CART: the
    model and prefix index; each FAISS index is built, timed and freed in turn)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars only
        tqdm = _no_bar

    device = torch.device(device)
    history = dict(history or {})
    n = gallery.n_candidates
    rows, skipped, warmups = [], [], {}
    info = {"n_candidates": n, "level_sizes": "×".join(map(str, gallery.level_sizes)),
            "decoder_weights": decoder.weights, "gallery_build_seconds": round(gallery.build_seconds, 2)}
    batches = sorted(cfg.batch_sizes)
    k = cfg.top_k
    nan = float("nan")
    n_rec = min(RECALL_QUERIES, len(queries.vectors))
    rec_q = queries.vectors[:n_rec]

    def record(system: str, b: int, t: Timing, recall: float) -> None:
        rows.append({"system": system, "device": device_label, "n_candidates": n, "batch_size": b, "beam": cfg.beam,
                     "qps": t.qps, "latency_ms_p50": t.latency_ms_p50, "peak_mem_mb": t.peak_mem_mb,
                     "recall_vs_exact": recall})
        warmups[(system, n, b)] = None if t.skipped else t.warmup_seconds
        if t.skipped:
            skipped.append({"system": system, "n_candidates": n, "batch_size": b, "reason": t.skipped})

    def run_group(group: dict[str, Callable[[int], Callable[[], object]]], recall: Mapping[str, float],
                  bar) -> None:
        pre = {name: predicted_skips(name, n, batches, {**history, **warmups}, cfg.max_batch_seconds)
               for name in group}
        for b in batches:
            fns = {name: make(b) for name, make in group.items()}
            skip = {name: pre[name][b] for name in group if b in pre[name]}
            for name in group:  # a smaller batch skipped just now: larger ones too
                if name not in skip and any(warmups.get((name, n, b2), 0.0) is None for b2 in batches if b2 < b):
                    skip[name] = f"batch {max(b2 for b2 in batches if b2 < b)} skipped already"
            res = time_interleaved(fns, batch_size=b, repeats=cfg.repeats, max_batch_seconds=cfg.max_batch_seconds,
                                   device=device, memory=memory, skip=skip)
            for name, t in res.items():
                record(name, b, t, recall.get(name, nan))
            bar.update(1)

    wanted = [s for s in systems if s in SYSTEMS]
    faiss_here = [s for s in FAISS_SYSTEMS if s in wanted and not (s == "faiss_hnsw" and n > cfg.hnsw_max_candidates)]
    n_groups = int(any(s in wanted for s in CART_SYSTEMS)) + int("dual_tower_exact" in wanted) + len(faiss_here)
    with tqdm(total=n_groups * len(batches), desc=f"N={n:,}", unit="batch size", disable=not progress,
              leave=False) as bar:
        # -- CART: one model, one prefix index, interleaved (the constraint-overhead ratio compares them)
        cart = [s for s in CART_SYSTEMS if s in wanted]
        if cart:
            index = gallery.index.to(device)
            dec, model = decoder.beam, decoder.model

            def end_to_end(b: int) -> Callable[[], object]:
                ids, mask = queries.batch(b)

                def fn():
                    with torch.inference_mode():
                        return dec.search(encode_bucketed(model, ids, mask), index, beam=cfg.beam, top_k=k)
                return fn

            makers = {"cart_end_to_end": end_to_end,
                      "cart_decode": lambda b: lambda: dec.search(states[b], index, beam=cfg.beam, top_k=k),
                      "unconstrained_decode": lambda b: lambda: dec.search(states[b], None, beam=cfg.beam, top_k=k)}
            run_group({s: makers[s] for s in cart}, {}, bar)
            del index
        # -- exact dual-tower search (torch), also the reference of recall_vs_exact
        exact_ids = None
        if "dual_tower_exact" in wanted or faiss_here:
            gal = torch.from_numpy(gallery.features).to(device=device, dtype=dtype)
            qv = torch.from_numpy(queries.vectors).to(device=device, dtype=dtype)
            block = SCORE_BLOCK_BYTES if device.type == "cpu" else 4 * SCORE_BLOCK_BYTES
            exact_ids = exact_topk(qv[:n_rec], gal, k=k, batch_size=256, block_bytes=block).indices.cpu().numpy()
            if "dual_tower_exact" in wanted:
                run_group({"dual_tower_exact": lambda b: lambda: exact_topk(qv[:b], gal, k=k, batch_size=b, block_bytes=block)},
                          {"dual_tower_exact": 1.0}, bar)
            del gal, qv
        # -- FAISS (CPU only), one index at a time
        if faiss_here:
            import faiss

            faiss.omp_set_num_threads(torch.get_num_threads())  # the same threads as torch
            for name in faiss_here:
                t0 = time.perf_counter()
                index, settings, recall = calibrated_faiss_index(name, gallery.features, seed=seed, hnsw_m=hnsw_m,
                                                       recall_queries=rec_q, exact=exact_ids, k=k)
                info.update(settings)
                info[f"{name}_build_seconds"] = round(time.perf_counter() - t0, 2)
                info[f"{name}_recall_vs_exact"] = round(recall, 4)
                run_group({name: lambda b, index=index: (lambda: index.search(queries.vectors[:b], k))},
                          {name: recall}, bar)
                del index
    return GalleryResult(rows, skipped, info, warmups)


def read_gpu_rows(path):
    """The rows of a GPU check CSV (``GPU_COLUMNS``; integer columns as nullable Int64), or None when
    ``path`` does not exist. A CSV of the former GPU script (``COLUMNS`` only, decode rows) is read
    as ``decode`` rows (``input`` "text" for ``cart_end_to_end``, else "encoded")."""
    import pandas as pd

    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return None
    frame = pd.read_csv(path, keep_default_na=True)
    if "kind" not in frame.columns:  # the former format: one decode row per system x size x batch
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(GPU_COLUMNS)} "
                             f"(scripts/gpu_check.py)")
        frame = frame.assign(kind="decode", name=frame["system"],
                             input=["text" if s == "cart_end_to_end" else "encoded" for s in frame["system"]])
    missing = [c for c in GPU_COLUMNS if c not in frame.columns and c not in ("precision", "top_k", "value", "unit",
                                                                              "target", "passed", "note")]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(GPU_COLUMNS)} (scripts/gpu_check.py)")
    for c in GPU_COLUMNS:
        if c not in frame.columns:
            frame[c] = float("nan") if c in ("top_k", "value", "target") else ""
    frame = frame[list(GPU_COLUMNS)].copy()
    for c in _GPU_INTS:
        frame[c] = pd.to_numeric(frame[c], errors="coerce").round().astype("Int64")
    for c in ("kind", "name", "system", "input", "precision", "device", "unit", "passed", "note"):
        frame[c] = frame[c].fillna("").astype(str)
    unknown = sorted(set(frame["kind"]) - set(GPU_KINDS))
    if unknown:
        raise ValueError(f"{path}: unknown row kind(s) {unknown}; expected {list(GPU_KINDS)}")
    return frame.reset_index(drop=True)
