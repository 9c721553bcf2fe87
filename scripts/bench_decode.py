"""Decoding throughput of CART (Fang et al., ACL 2025): constrained vs unconstrained beam search.

A 2-layer, width-384 decoder (two-branch fusion over S=6 encoder layers of width 384, T=16 random
encoder states), beam 10, batches of 100 queries, identifiers of length 4, galleries of 1K and 1M
random identifiers. Prints queries/s (median of repeats after a warm-up) and the ratios
constrained/unconstrained (constraint overhead) and 1M/1K (flatness in the gallery size).
Targets on 2 CPU cores: >= 200 queries/s, overhead ratio >= 0.85, flatness >= 0.9. Not a test.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_decode.py [--device cpu] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertModel

from bench_prefix import random_identifiers  # scripts/ is on sys.path when run as a script
from cartlib.decode import constrained_beam_search, unconstrained_beam_search
from cartlib.ids.prefix import PrefixIndex
from cartlib.model.cart import CartModel, EncoderStates


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, *, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--galleries", type=int, nargs="+", default=[1_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--fusion", choices=["two_branch", "last_layer"], default="two_branch")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    galleries = {n: random_identifiers(n, (256, 256, 256), seed=n) for n in args.galleries}
    sizes = (256, 256, 256, max(s[-1] for _, s in galleries.values()))  # one decoder for all galleries
    enc_cfg = BertConfig(vocab_size=8, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=64)
    model = CartModel(
        text_encoder=BertModel(enc_cfg), freeze_encoder=True, level_sizes=sizes,
        d_model=384, n_layers=2, n_heads=6, fusion=args.fusion == "two_branch",
    ).to(device).eval()
    s, t = model.n_enc_layers, 16
    encoded = EncoderStates(
        layers=torch.randn(s, args.batch, t, model.d_enc, device=device),
        mask=torch.ones(args.batch, t, dtype=torch.bool, device=device),
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"decoder 2 layers x 384, fusion={args.fusion}, S={s}, T={t}, beam {args.beam}, batch {args.batch}, "
          f"level sizes {sizes}")

    sec = measure(lambda: unconstrained_beam_search(model, encoded, beam=args.beam, top_k=args.beam),
                  device=device, warmup=args.warmup, repeats=args.repeats)
    qps_free = args.batch / sec
    print(f"unconstrained: {qps_free:8.1f} queries/s ({sec * 1e3:.1f} ms per batch)")
    qps = {}
    for n, (codes, _) in galleries.items():
        index = PrefixIndex.build(codes, sizes).to(device)
        sec = measure(lambda: constrained_beam_search(model, encoded, index, beam=args.beam, top_k=args.beam),
                      device=device, warmup=args.warmup, repeats=args.repeats)
        qps[n] = args.batch / sec
        print(f"constrained N={n:>9,}: {qps[n]:8.1f} queries/s ({sec * 1e3:.1f} ms per batch); "
              f"constrained/unconstrained = {qps[n] / qps_free:.3f}")
    if len(qps) > 1:
        lo, hi = min(qps), max(qps)
        print(f"flatness N={hi:,} / N={lo:,}: {qps[hi] / qps[lo]:.3f}")


if __name__ == "__main__":
    main()
