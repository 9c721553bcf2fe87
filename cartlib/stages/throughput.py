"""Stage `throughput`: queries/s of CART decoding against dual-tower and FAISS search as the gallery
grows (CART, Fang et al., ACL 2025, Figure 4 analogue; the paper reports CART's queries/s flat in
the number of candidates N, dual-tower search slowing down with N).

Galleries (:mod:`cartlib.bench.galleries`) are sampled from the task's real item features and
identified by its real identifier model; every system (:mod:`cartlib.bench.measure`) is timed at
every gallery size and batch size by :mod:`cartlib.bench.timing`; the targets are summarised by
:mod:`cartlib.bench.analysis`; the figure is :func:`cartlib.viz.throughput_figure`. Results go
through :func:`cartlib.results.publish_suite` to ``results/throughput/``.

Decoder weights: ``models/<task>/cart.pt`` (through :func:`cartlib.stages.train.load_bundle`) for
the galleries whose level sizes match its identifier vocabulary; a larger gallery has a larger
unique-token level, so it gets a model of the trained config with random weights (throughput does
not depend on the weights; ``galleries.csv`` and the caption say which is which).
"""
from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cartlib.bench.analysis import (GPU_BATCH, RATIO_BATCH, crossover, decoder_flops_per_query, gpu_decode_rows,
                                    gpu_summary, mean_tokens, summarise)
from cartlib.bench.galleries import build_gallery, fit_feature_mixture, fit_identifier_model
from cartlib.bench.measure import (COLUMNS, GPU_COLUMNS, SYSTEMS, Decoder, measure_gallery, random_decoder,
                                   read_gpu_rows)
from cartlib.bench.queries import encode_bucketed, make_query_set
from cartlib.bench.timing import PeakMemory, device_name, matmul_flops_per_second, retain_freed_memory
from cartlib.decode import BeamDecoder
from cartlib.model.cart import EncoderStates

__all__ = ["ThroughputResult", "run", "GPU_ROWS", "GPU_TABLE", "GPU_HOWTO", "gpu_tables"]

GPU_ROWS = "throughput_gpu.csv"  # an INPUT: the GPU check's CSV (scripts/gpu_check.py), committed by hand
GPU_TABLE = "gpu_rows"  # its rows merged into results/throughput/gpu_rows.csv (+ gpu_rows.timings.csv)
GPU_HOWTO = ("run `python3 scripts/gpu_check.py` on a GPU machine, copy its CSV to "
             "results/throughput/throughput_gpu.csv and rerun this stage")


class ThroughputResult(NamedTuple):
    table: object  # pandas DataFrame, COLUMNS (the rows of throughput.csv)
    figure: object  # matplotlib Figure
    metrics: dict  # metrics.json (nothing measured by a clock)
    timings: dict  # timings.json: queries/s, ratios, crossover, seconds
    galleries: object  # DataFrame: per gallery, level sizes, decoder weights, build times, FAISS settings
    skipped: object  # DataFrame: system, n_candidates, batch_size, reason
    caption: str
    gpu: object = None  # DataFrame of the GPU check's rows (GPU_COLUMNS), None without throughput_gpu.csv


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found; run `{_stage_hint(path)}` first")
    return path


def _stage_hint(path: Path) -> str:
    parts = path.parts
    task = parts[parts.index("data") + 1] if "data" in parts and parts.index("data") + 1 < len(parts) else "<task>"
    if "features" in parts:
        return f"dvc repro features@{task}` (or `cart-stage features --task {task}"
    return f"dvc repro data@{task}` (or `cart-stage data --task {task}"


def _empty_gpu_table():
    import pandas as pd

    frame = pd.DataFrame({c: pd.Series(dtype="object") for c in GPU_COLUMNS})
    for c in ("n_candidates", "batch_size", "beam", "top_k"):
        frame[c] = frame[c].astype("Int64")
    for c in ("qps", "latency_ms_p50", "peak_mem_mb", "recall_vs_exact", "value", "target"):
        frame[c] = frame[c].astype("float64")
    return frame


def gpu_tables(gpu):
    """What the notebook shows of the GPU check: ``(queries/s pivot of the decode rows, the train /
    agreement / check / target rows)``, or a sentence saying that there are no GPU rows."""
    if gpu is None or not len(gpu):
        return f"No GPU rows: results/throughput/{GPU_ROWS} is absent; {GPU_HOWTO}."
    dec = gpu[gpu["kind"] == "decode"].astype({"n_candidates": "float64", "qps": "float64"})
    pivot = dec.pivot_table(index=["system", "input", "batch_size"], columns="n_candidates", values="qps").round(0)
    checks = gpu[gpu["kind"].isin(["train", "agreement", "check", "target", "decode_compile"])][
        ["kind", "name", "system", "n_candidates", "batch_size", "qps", "value", "unit", "target", "passed", "note"]]
    return pivot, checks.reset_index(drop=True)


def run(params, root: str | os.PathLike = ".", *, progress: bool = True) -> ThroughputResult:
    """The `throughput` stage: every system at every gallery size and batch size of
    ``params.throughput``; writes ``results/throughput/{throughput.csv, throughput.png, throughput.pdf,
    metrics.json, timings.json, galleries.csv, skipped.csv}`` and logs an MLflow run ``throughput``
    (:func:`cartlib.results.publish_suite`). The rows of ``results/throughput/throughput_gpu.csv``
    (``scripts/gpu_check.py``), when present, are merged into ``results/throughput/gpu_rows.csv``
    (+ ``gpu_rows.timings.csv``: their measured columns), summarised in timings.json (``gpu_*``)
    and drawn as the figure's GPU panel; without it those tables are empty and the panel says so."""
    import pandas as pd
    from tqdm.auto import tqdm

    from cartlib import io, viz
    from cartlib.results import publish_suite
    from cartlib.config import check_task, resolve_device
    from cartlib.data import schema
    from cartlib.data.features import load_features
    from cartlib.paths import task_paths

    cfg = params.throughput
    task = check_task(cfg.task, None)
    if min(cfg.sizes) < cfg.top_k:
        raise ValueError(f"throughput.sizes: the smallest gallery ({min(cfg.sizes)}) holds fewer candidates than "
                         f"throughput.top_k={cfg.top_k}")
    paths = task_paths(root, task)
    out_dir = paths.root / "results" / "throughput"
    _require(paths.dataset, "dataset folder")
    for name in ("items.npy", "captions.npy", "caption_ids.tsv", "manifest.json"):
        _require(paths.features / name, "item/caption features file")
    device = torch.device(resolve_device(params.base.device))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    seed = params.base.seed
    t_start = time.perf_counter()
    allocator_retains = retain_freed_memory()

    dataset = schema.load_dataset(paths.dataset, verify_hashes=False)
    feats = load_features(paths.features, dataset)
    id_model = fit_identifier_model(feats.items, params.identifiers, seed=seed,
                                    device=resolve_device(params.base.device))
    refit_matches = float("nan")
    table_path = paths.data / "identifiers" / "cart.npz"
    if table_path.exists():
        with np.load(table_path, allow_pickle=False) as z:
            refit_matches = float(np.array_equal(z["codes"], id_model.codes_))
    mixture = fit_feature_mixture(feats.items, id_model.labels_)

    # -- queries: the test reference captions (the benchmark's queries) and their features
    queries_df = dataset.queries("test")
    if not len(queries_df):
        queries_df = dataset.captions[dataset.captions["kind"] == "reference"]
    row_of = pd.Series(np.arange(len(feats.caption_ids)), index=feats.caption_ids)
    queries_df = queries_df[queries_df["caption_id"].isin(row_of.index)]
    if not len(queries_df):
        raise ValueError(f"{paths.features / 'caption_ids.tsv'}: no reference caption of the dataset has features; "
                         f"rerun the features stage")
    q_vectors = feats.captions[row_of[queries_df["caption_id"]].to_numpy()]

    # -- the decoder: the trained one where its level sizes match, else random weights of its config
    from cartlib.encoders.text import load_text_encoder

    bundle_path = paths.models / "cart.pt"
    bundle = io.torch_load(bundle_path) if bundle_path.exists() else None
    from cartlib.config import TrainConfig

    train_cfg = TrainConfig(**bundle["train_config"]) if bundle else params.train
    tokenizer, encoder = load_text_encoder()
    encoder = encoder.to(device=device, dtype=dtype).eval()
    queries = make_query_set(queries_df["text"].tolist(), q_vectors, n=max(cfg.batch_sizes), seed=seed,
                             tokenizer=tokenizer, max_length=train_cfg.max_length, device=device)
    decoders: dict[tuple[int, ...], Decoder] = {}
    states_by_encoder: dict[int, dict[int, EncoderStates]] = {}

    def decoder_for(sizes: tuple[int, ...]) -> Decoder:
        if sizes in decoders:
            return decoders[sizes]
        dec = None
        if bundle is not None and tuple(bundle["level_sizes"]) == sizes:
            try:
                from cartlib.data.idstore import load_identifiers
                from cartlib.stages.train import load_bundle

                table = load_identifiers(paths.data / "identifiers", bundle["scheme"])
                _, model, _ = load_bundle(bundle_path, table=table, device=str(device))
                model = model.to(dtype=dtype).eval()
                dec = Decoder(model, BeamDecoder(model), f"trained ({bundle_path.relative_to(paths.root)})")
            except (ValueError, FileNotFoundError, schema.DataFormatError) as e:
                print(f"throughput: not using {bundle_path} ({e}); random decoder weights instead")
        if dec is None:
            where = "trained config" if bundle is not None else "params.train"
            dec = random_decoder(encoder, sizes, train_cfg, seed=seed, device=device, dtype=dtype,
                                 weights=f"random ({where})")
        decoders[sizes] = dec
        return dec

    def states_for(dec: Decoder) -> dict[int, EncoderStates]:
        key = id(dec.model.encoder)
        if key not in states_by_encoder:
            with torch.inference_mode():
                states_by_encoder[key] = {b: encode_bucketed(dec.model, *queries.batch(b)) for b in cfg.batch_sizes}
        return states_by_encoder[key]

    label = device_name(device)
    memory = PeakMemory(device)
    rows, skipped, infos, history = [], [], [], {}
    flops = None
    for n in tqdm(sorted(cfg.sizes), desc="galleries", unit="gallery", disable=not progress):
        gallery = build_gallery(mixture, id_model, n, seed=seed + n)
        dec = decoder_for(gallery.level_sizes)
        states = states_for(dec)
        res = measure_gallery(gallery, decoder=dec, queries=queries, states=states, cfg=cfg, device=device,
                              dtype=dtype, device_label=label, hnsw_m=params.baselines.hnsw_m, seed=seed,
                              history=history, memory=memory, progress=progress)
        rows += res.rows
        skipped += res.skipped
        infos.append(res.info)
        history.update(res.warmups)
        if n == max(cfg.sizes):
            b = min(cfg.batch_sizes, key=lambda x: (abs(x - RATIO_BATCH), x))
            flops = decoder_flops_per_query(dec.model, n_tokens=mean_tokens(states[b]), beam=cfg.beam)
        del gallery
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    skipped_df = pd.DataFrame(skipped, columns=["system", "n_candidates", "batch_size", "reason"])
    galleries = pd.DataFrame(infos)
    matmul = matmul_flops_per_second(device=device, dtype=dtype)
    summary = summarise(table, flops_per_query=flops, matmul_flops=matmul)
    metrics, timings = summary.metrics, summary.timings
    metrics["identifier_refit_matches_stage"] = None if math.isnan(refit_matches) else refit_matches
    metrics["trained_decoder_galleries"] = int(galleries["decoder_weights"].str.startswith("trained").sum())
    timings["allocator_retains_freed_memory"] = allocator_retains  # a property of this process
    timings["seconds"] = round(time.perf_counter() - t_start, 1)

    gpu = read_gpu_rows(out_dir / GPU_ROWS)
    if gpu is not None:
        timings.update(gpu_summary(gpu))  # read from the input file, not measured here: timings all the same
    caption = _caption(label=label, device=device, memory=memory, galleries=galleries, metrics=metrics,
                       timings=timings, cfg=cfg, gpu=gpu)
    figure = viz.throughput_figure(table, systems=SYSTEMS, ratio_batch=RATIO_BATCH, crossover=crossover,
                                   caption=caption, gpu=None if gpu is None else gpu_decode_rows(gpu, batch_size=None),
                                   gpu_batch=GPU_BATCH, gpu_note=GPU_HOWTO)
    publish_suite(paths.root, "throughput", params=params, metrics=metrics, timings=timings,
                  csv_tables={"throughput": table, "galleries": galleries, "skipped": skipped_df,
                              GPU_TABLE: gpu if gpu is not None else _empty_gpu_table()},
                  figures={"throughput": figure})
    return ThroughputResult(table, figure, metrics, timings, galleries, skipped_df, caption, gpu)


def _processor(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA {torch.version.cuda}"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _caption(*, label: str, device: torch.device, memory: PeakMemory, galleries, metrics: dict, timings: dict, cfg,
             gpu) -> str:
    try:
        import faiss

        faiss_v = faiss.__version__
    except ImportError:
        faiss_v = "absent"
    weights = "; ".join(f"N={r.n_candidates:,}: {r.level_sizes} ({r.decoder_weights})" for r in galleries.itertuples())
    parts = [
        f"Device {label} ({_processor(device)}), torch {torch.__version__}, faiss {faiss_v}, "
        f"{'fp16' if device.type == 'cuda' else 'fp32'}; beam {cfg.beam}, top-{cfg.top_k}; median of {cfg.repeats} "
        f"repeats after a warm-up.",
        f"Galleries sampled from the task's real item features (per-cluster low-rank Gaussians), CART identifiers "
        f"from the task's identifier model; level sizes and decoder weights: {weights}.",
        f"Peak memory: {memory.kind}"
        f"{'; freed blocks up to 256 MiB kept in the process (mallopt)' if timings.get('allocator_retains_freed_memory') else ''}.",
        f"Decoder {metrics.get('decoder_flops_per_query', float('nan')) / 1e6:.0f} MFLOP/query; matmul rate "
        f"{timings.get('matmul_gflops', float('nan')):.0f} GFLOP/s.",
    ]
    if gpu is not None:
        dev = timings.get("gpu_device") or "a GPU"
        parts.append(f"GPU panel: {dev}, rows of results/throughput/{GPU_ROWS} (scripts/gpu_check.py; fp16 "
                     f"decoding and dual tower, random-weight MiniLM-shaped query encoder, batch {GPU_BATCH:,} or the "
                     f"closest; all GPU rows in results/throughput/{GPU_TABLE}.csv).")
    else:
        parts.append(f"No GPU rows (results/throughput/{GPU_ROWS} absent): {GPU_HOWTO}.")
    return " ".join(parts)
