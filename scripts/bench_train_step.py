"""Benchmark: CART training speed (texts/s) as the train stage trains, and its share of the machine's
matrix-product rate.

The model is params.yaml's `train:` model (frozen MiniLM, fusion, R-Drop ω) on identifiers of
params.yaml's shape (K + M levels + the unique token); the texts are caption-like sentences. One
epoch of ``--texts`` texts is timed inside ``cartlib.train.train_cart`` (the encoder's states are
computed once before, as the stage does, and are not timed), for every ``--nproc`` given (data
parallel: worker processes started by torch's elastic launcher, gloo on the CPU). The model's
FLOPs per text come from ``torch.utils.flop_counter`` on one training step; the matrix-product
rate is the median of fp32 1024×1024 products on the same threads. Prints one line per setting:

    nproc=1: 2048 texts in 41.2 s = 49.7 texts/s (3.9 GFLOP/text → 194 GFLOP/s = 0.61 of 320 GFLOP/s matmul)

Run: `.venv/bin/python scripts/bench_train_step.py [--nproc 1 2] [--texts 2048] [--precision fp32|bf16]`.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = {"size": ["small", "large", "tiny", "big"], "colour": ["red", "blue", "green", "crimson", "yellow", "white"],
         "shape": ["circle", "square", "star", "triangle", "ring", "cross"],
         "where": ["in the upper left", "at the bottom", "near the centre", "on the right", "in the corner"],
         "ground": ["on stripes", "on a dark background", "over a gradient", "on a plain field"]}


def caption(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        parts.append(f"a {rng.choice(WORDS['size'])} {rng.choice(WORDS['colour'])} {rng.choice(WORDS['shape'])} "
                     f"{rng.choice(WORDS['where'])}")
    return " next to ".join(parts) + f" {rng.choice(WORDS['ground'])}"


def matmul_rate(n: int = 1024, repeats: int = 10) -> float:
    """fp32 GFLOP/s of an n×n matrix product on this process's threads (median)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def flops_per_text(model, tokenizer, texts, codes, *, consistency_weight: float, precision: str) -> float:
    """Forward + backward FLOPs of one training step, per text (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cartlib.train import EncodedTexts, TrainBatch, train_step, _param_groups, _tokenize

    ids, mask = _tokenize(tokenizer, texts, 48)
    states = EncodedTexts.build(model, ids, mask)
    opt = torch.optim.AdamW(_param_groups(model, 0.01), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    idx = torch.arange(len(texts))
    batch = TrainBatch(None, None, codes, states.batch(idx, "cpu"))
    model.train()
    with FlopCounterMode(display=False) as counter:
        train_step(model, opt, sched, batch, consistency_weight=consistency_weight, grad_clip=1.0, precision=precision)
    return counter.get_total_flops() / len(texts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="data-parallel processes to compare")
    ap.add_argument("--texts", type=int, default=2048, help="texts in the timed epoch")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from cartlib.config import load_params
    from cartlib.encoders.text import load_text_encoder
    from cartlib.model.cart import CartModel
    from cartlib.train import train_cart

    params = load_params(ROOT / "params.yaml")
    cfg, ids_cfg = params.train, params.identifiers
    level_sizes = (ids_cfg.n_clusters,) + (ids_cfg.codebook_size,) * ids_cfg.n_levels + (16,)
    rng = random.Random(0)
    texts = [caption(rng) for _ in range(args.texts)]
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, k, (args.texts,), generator=g) for k in level_sizes], 1)
    tokenizer, encoder = load_text_encoder()

    def model() -> CartModel:
        torch.manual_seed(0)
        return CartModel(text_encoder=encoder, freeze_encoder=True, level_sizes=level_sizes, d_model=cfg.d_model,
                         n_layers=cfg.n_layers, n_heads=cfg.n_heads, dropout=cfg.dropout, fusion=cfg.fusion)

    threads = torch.get_num_threads()
    rate = matmul_rate()
    flops = flops_per_text(model(), tokenizer, texts[: cfg.batch_size], codes[: cfg.batch_size],
                           consistency_weight=cfg.consistency_weight, precision=args.precision)
    print(f"model: d_model={cfg.d_model} n_layers={cfg.n_layers} fusion={cfg.fusion} ω={cfg.consistency_weight} "
          f"batch={cfg.batch_size} levels={level_sizes} precision={args.precision}; torch threads {threads}")
    for nproc in args.nproc:
        result = train_cart(model(), tokenizer=tokenizer, texts=texts, codes=codes, epochs=1, batch_size=cfg.batch_size,
                            lr=cfg.lr, consistency_weight=cfg.consistency_weight, max_length=cfg.max_length,
                            progress=False, precision=args.precision, nproc=nproc)
        seconds = result.history[0]["seconds"]
        per_s = args.texts / seconds
        achieved = per_s * flops / 1e9
        print(f"nproc={nproc}: {args.texts} texts in {seconds:.1f} s = {per_s:.1f} texts/s "
              f"({flops / 1e9:.2f} GFLOP/text → {achieved:.1f} GFLOP/s = {achieved / rate:.2f} of "
              f"{rate:.1f} GFLOP/s fp32 matmul on {threads} threads)")


if __name__ == "__main__":
    main()
