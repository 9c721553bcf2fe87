"""The throughput benchmark (Figure 4 analogue) on a GPU machine: CART decoding vs exact dual-tower search.

Runs the measurement of `cartlib.bench` (the `throughput` stage, `cartlib.stages.throughput`) on a machine that has torch and
transformers but neither FAISS nor the bundled MiniLM weights, and appends its rows (same columns
as results/throughput/throughput.csv, device = the GPU's name) to a CSV. Copy that file to
results/throughput/throughput_gpu.csv and the stage's figure shows it as a second panel.

What differs from the stage, and why the numbers still compare:
- the query encoder is all-MiniLM-L6-v2 built from its config (BERT, hidden 384, 6 layers, 12 heads,
  intermediate 1536, vocab 30522) with random weights: its cost depends on the shapes, not the
  weights; queries are random token ids with caption-like lengths (12-32 tokens);
- galleries are sampled from data/<task>/features/items.npy when it is there (no dataset folder
  needed), else from a random-but-real-shaped stand-in (6,000 unit vectors in 384 dimensions, 64
  clusters of low intrinsic dimension); identifiers always come from a CART identifier model
  (K-Means + RQ-VAE) fitted on those features with params.yaml's `identifiers:` section;
- the decoder has the config of models/<task>/cart.pt when present (its trained weights where the
  gallery's level sizes match), else of params.yaml `train:`; random weights otherwise;
- FAISS rows are skipped (no FAISS); fp16 on CUDA, fp32 on a CPU.

    python3 scripts/bench_throughput_gpu.py                      # params.yaml sizes, $OUT/throughput_gpu.csv
    python3 scripts/bench_throughput_gpu.py --smoke --device cpu # tiny sizes, a minute on a CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's cartlib, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=None,
                    help="CSV to append rows to (default: $OUT/throughput_gpu.csv, else "
                         "results/throughput/throughput_gpu.csv)")
    ap.add_argument("--root", default=str(ROOT), help="repository root (params.yaml, data/, models/)")
    ap.add_argument("--task", default=None, help="task whose features/model seed the galleries (default: "
                                                 "params.yaml throughput.task)")
    ap.add_argument("--sizes", type=int, nargs="+", help="candidates per gallery (default: params.yaml)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", help="queries per batch (default: params.yaml)")
    ap.add_argument("--repeats", type=int, help="timed repeats after a warm-up (default: params.yaml)")
    ap.add_argument("--max-batch-seconds", type=float, help="skip a combination whose warm-up is slower")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (galleries of 100 and 1,000, batches 1 and 8), params.yaml's smoke overrides, "
                         "a small stand-in for the real features: checks the script in a minute, even on a CPU")
    ap.add_argument("--seed", type=int, default=None, help="default: params.yaml base.seed")
    return ap.parse_args(argv)


def load_params(root: Path, smoke: bool):
    """params.yaml of ``root`` (with its smoke overrides when ``smoke``), or the built-in defaults."""
    import yaml

    from cartlib.config import Params, params_from_dict

    path = root / "params.yaml"
    if not path.exists():
        return Params()
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if smoke:
        raw.setdefault("base", {})["scale"] = "smoke"
    return params_from_dict(raw, source=str(path))


def stand_in_features(n: int, *, dim: int = 384, clusters: int = 64, rank: int = 16, seed: int = 0) -> np.ndarray:
    """Real-shaped item features when the real ones are absent: unit vectors in ``clusters`` clusters
    of low intrinsic dimension (a random ``rank``-dimensional subspace each, plus small noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = rng.standard_normal((clusters, rank, dim)).astype(np.float32) / np.sqrt(dim)
    label = rng.integers(0, clusters, n)
    x = centres[label] + np.einsum("nr,nrd->nd", rng.standard_normal((n, rank)).astype(np.float32) * 0.35,
                                   bases[label])
    x += 0.02 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_tokens(n: int, *, seed: int, low: int = 12, high: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random BERT inputs ([CLS] words [SEP], padded) with caption-like lengths in [low, high]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g)
    ids = torch.zeros(n, high, dtype=torch.long)
    mask = torch.arange(high)[None, :] < lengths[:, None]
    ids[mask] = torch.randint(1000, MINILM["vocab_size"], (int(mask.sum()),), generator=g)
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(n), lengths - 1] = 102  # [SEP]
    return ids, mask.long()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    from cartlib import io
    from cartlib.bench import analysis, galleries, measure, queries as bench_queries, timing
    from cartlib.config import TrainConfig
    from cartlib.decode import BeamDecoder
    from cartlib.model.cart import CartModel

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root).resolve()
    params = load_params(root, args.smoke)
    cfg = params.throughput
    over = {}
    if args.smoke:
        over.update(sizes=(100, 1000), batch_sizes=(1, 8), repeats=1)
    if args.task:
        over["task"] = args.task
    if args.sizes:
        over["sizes"] = tuple(args.sizes)
    if args.batch_sizes:
        over["batch_sizes"] = tuple(args.batch_sizes)
    if args.repeats:
        over["repeats"] = args.repeats
    if args.max_batch_seconds:
        over["max_batch_seconds"] = args.max_batch_seconds
    cfg = dataclasses.replace(cfg, **over)
    seed = params.base.seed if args.seed is None else args.seed
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda, but torch sees no CUDA device")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) if os.environ.get("OUT")
                                           else root / "results" / "throughput") / "throughput_gpu.csv"
    label = timing.device_name(device)
    print(f"device {label}, torch {torch.__version__}, {'fp16' if dtype == torch.float16 else 'fp32'}; "
          f"sizes {list(cfg.sizes)}, batches {list(cfg.batch_sizes)}, repeats {cfg.repeats}; rows -> {out}", flush=True)

    # -- real features (or a stand-in), the identifier model and the gallery distribution
    t0 = time.perf_counter()
    feat_dir = root / "data" / cfg.task / "features"
    if (feat_dir / "items.npy").exists():
        items = np.load(feat_dir / "items.npy").astype(np.float32)
        source = str(feat_dir / "items.npy")
    else:
        items = stand_in_features(600 if args.smoke else 6000, seed=seed)
        source = "random stand-in (no data/<task>/features/items.npy)"
    ids_cfg = params.identifiers
    if ids_cfg.n_clusters > len(items):
        ids_cfg = dataclasses.replace(ids_cfg, n_clusters=max(1, len(items) // 4))
    id_model = galleries.fit_identifier_model(items, ids_cfg, seed=seed)
    mixture = galleries.fit_feature_mixture(items, id_model.labels_)
    if (feat_dir / "captions.npy").exists():
        q_vectors = np.load(feat_dir / "captions.npy", mmap_mode="r")
        q_vectors = np.asarray(q_vectors[: min(len(q_vectors), 20_000)], dtype=np.float32)
    else:
        q_vectors = galleries.sample_features(mixture, max(cfg.batch_sizes), seed=seed + 1)
    n_q = max(cfg.batch_sizes)
    tok_ids, tok_mask = random_tokens(len(q_vectors), seed=seed)
    queries = bench_queries.make_query_set(None, q_vectors, n=n_q, seed=seed, token_ids=tok_ids,
                                           token_mask=tok_mask, device=device)
    print(f"features: {source} ({len(items):,} items); identifier model fitted in {time.perf_counter() - t0:.1f} s",
          flush=True)

    # -- the decoder config (and trained weights where the level sizes match)
    bundle_path = root / "models" / cfg.task / "cart.pt"
    bundle = torch.load(bundle_path, map_location="cpu", weights_only=False) if bundle_path.exists() else None
    train_cfg = TrainConfig(**bundle["train_config"]) if bundle else params.train
    torch.manual_seed(seed)
    encoder = BertModel(BertConfig(**MINILM)).to(device=device, dtype=dtype).eval()  # random MiniLM
    decoders: dict[tuple[int, ...], measure.Decoder] = {}

    def decoder_for(sizes: tuple[int, ...]) -> measure.Decoder:
        if sizes not in decoders:
            if bundle is not None and tuple(bundle["level_sizes"]) == sizes:
                model = CartModel(text_encoder=encoder, freeze_encoder=True, level_sizes=sizes,
                                  d_model=train_cfg.d_model, n_layers=train_cfg.n_layers, n_heads=train_cfg.n_heads,
                                  dropout=train_cfg.dropout, fusion=train_cfg.fusion)
                state = {k: v for k, v in bundle["state_dict"].items() if not k.startswith("encoder.")}
                missing, unexpected = model.load_state_dict(state, strict=False)
                bad = [k for k in missing if not k.startswith("encoder.")]
                if bad or unexpected:
                    raise SystemExit(f"{bundle_path}: checkpoint does not fit its config (missing {bad[:3]}, "
                                     f"unexpected {unexpected[:3]})")
                model = model.to(device=device, dtype=dtype).eval()
                decoders[sizes] = measure.Decoder(model, BeamDecoder(model), "trained decoder, random MiniLM")
            else:
                where = "trained config" if bundle is not None else "params.train"
                decoders[sizes] = measure.random_decoder(encoder, sizes, train_cfg, seed=seed, device=device,
                                                       dtype=dtype, weights=f"random ({where})")
        return decoders[sizes]

    timing.retain_freed_memory()  # as the stage does: no page faults on every step's activations
    memory = timing.PeakMemory(device)
    rows, infos, history = [], [], {}
    flops = None
    for n in sorted(cfg.sizes):
        gallery = galleries.build_gallery(mixture, id_model, n, seed=seed + n)
        dec = decoder_for(gallery.level_sizes)
        with torch.inference_mode():
            states = {b: bench_queries.encode_bucketed(dec.model, *queries.batch(b)) for b in cfg.batch_sizes}
        res = measure.measure_gallery(gallery, decoder=dec, queries=queries, states=states, cfg=cfg, device=device,
                                      dtype=dtype, device_label=label, systems=measure.SYSTEMS[:4], seed=seed,
                                      history=history, memory=memory, progress=True)
        rows += res.rows
        infos.append(res.info)
        history.update(res.warmups)
        b_ratio = min(cfg.batch_sizes, key=lambda x: (abs(x - analysis.RATIO_BATCH), x))
        flops = analysis.decoder_flops_per_query(dec.model, n_tokens=analysis.mean_tokens(states[b_ratio]), beam=cfg.beam)
        print(f"N={n:,}: level sizes {gallery.level_sizes}, {dec.weights}, gallery built in "
              f"{gallery.build_seconds:.1f} s", flush=True)
        del gallery, states

    import pandas as pd

    table = pd.DataFrame(rows, columns=list(measure.COLUMNS))
    old = pd.read_csv(out) if out.exists() else None
    merged = table if old is None else pd.concat([old[list(measure.COLUMNS)], table], ignore_index=True)
    with io.atomic_path(out) as tmp:
        merged.to_csv(tmp, index=False)
    summary = analysis.summarise(table, flops_per_query=flops,
                                 matmul_flops=timing.matmul_flops_per_second(device=device, dtype=dtype))
    metrics = {**summary.metrics, **summary.timings}  # a record of this GPU run (no committed contract)
    metrics.update(device=label, torch=torch.__version__, memory=memory.kind, features=source,
                   galleries=infos)
    io.write_json(out.with_name(out.stem + "_metrics.json"), metrics)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    print(json.dumps({k: v for k, v in metrics.items() if k != "galleries"}, indent=1, default=str))
    print(f"appended {len(table)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
