"""Decoding throughput of CART (Fang et al., ACL 2025): constrained vs unconstrained beam search.

A 2-layer, width-384 decoder (two-branch fusion over S=6 encoder layers of width 384, T=16 random
encoder states), beam 10, batches of 100 queries, identifiers of length 4, galleries of 1K and 1M
random identifiers. Prints queries/s (median of repeats after a warm-up) and the ratios
constrained/unconstrained (constraint overhead) and 1M/1K (flatness in the gallery size).
Targets on 2 CPU cores: >= 200 queries/s, overhead ratio >= 0.85, flatness >= 0.9. Not a test.

The variants are timed in interleaved rounds (round r runs every variant once), so load from
other processes on a shared machine hits them alike, and both wall-clock and process CPU time are
reported: with ``--threads 1`` the CPU-time figure is what one idle core would give.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_decode.py [--device cpu] [--threads 2]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Callable, NamedTuple

import torch
from transformers import BertConfig, BertModel

from bench_prefix import random_identifiers  # scripts/ is on sys.path when run as a script
from cartlib.decode import constrained_beam_search, default_precision, unconstrained_beam_search
from cartlib.ids.prefix import PrefixIndex
from cartlib.model.cart import CartModel, EncoderStates


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timing(NamedTuple):
    wall: float  # median wall-clock seconds per call
    cpu: float  # median process CPU seconds per call (all threads)


def measure(fns: dict[str, Callable[[], object]], *, device: torch.device, warmup: int, repeats: int) -> dict[str, Timing]:
    """Median wall and CPU seconds of each ``fn()``, in interleaved rounds after ``warmup`` rounds."""
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if r >= warmup:
                walls[name].append(time.perf_counter() - w0)
                cpus[name].append(time.process_time() - c0)
    return {k: Timing(statistics.median(walls[k]), statistics.median(cpus[k])) for k in fns}


def macs_per_query(model: CartModel, *, t: int, beam: int) -> tuple[int, int]:
    """Multiply-adds per query of the dense layers: (encoder-side K/V, decoder steps)."""
    d, s, de, n_layers = model.d_model, model.n_enc_layers, model.d_enc, len(model.layers)
    d_ff = model.layers[0].ff[0].out_features
    two = model.fusion_mode.value == "two_branch"
    mem = (t * s * de * d + 2 * t * d * d + 2 * s * t * de * d) if two else 2 * t * de * d
    per_token = 4 * d * d + 2 * d * d_ff + ((3 + 2 * s) * d * d if two else 2 * d * d)
    dec, w = 0, 1
    for k in model.level_sizes:
        dec += w * (n_layers * per_token + d * k)
        w = min(beam, w * k)
    return n_layers * mem, dec


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
    ap.add_argument("--d-ff", type=int, default=0, help="decoder FFN width (0: the model default, 4 x 384)")
    ap.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                    help="decoding precision (default: cartlib.decode.default_precision of the device)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or default_precision(device).value
    torch.manual_seed(0)

    galleries = {n: random_identifiers(n, (256, 256, 256), seed=n) for n in args.galleries}
    sizes = (256, 256, 256, max(s[-1] for _, s in galleries.values()))  # one decoder for all galleries
    enc_cfg = BertConfig(vocab_size=8, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=64)
    model = CartModel(
        text_encoder=BertModel(enc_cfg), freeze_encoder=True, level_sizes=sizes,
        d_model=384, n_layers=2, n_heads=6, fusion=args.fusion == "two_branch", d_ff=args.d_ff or None,
    ).to(device).eval()
    s, t = model.n_enc_layers, 16
    encoded = EncoderStates(
        layers=torch.randn(s, args.batch, t, model.d_enc, device=device),
        mask=torch.ones(args.batch, t, dtype=torch.bool, device=device),
    )
    print(f"load average before the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"decoder 2 layers x 384, fusion={args.fusion}, S={s}, T={t}, beam {args.beam}, batch {args.batch}, "
          f"level sizes {sizes}, {precision}")
    mem, dec = macs_per_query(model, t=t, beam=args.beam)
    print(f"model work per query: {(mem + dec) / 1e6:.0f} M multiply-adds "
          f"(encoder-side K/V {mem / 1e6:.0f} M, decoder steps {dec / 1e6:.0f} M)")

    fns: dict[str, Callable[[], object]] = {
        "unconstrained": lambda: unconstrained_beam_search(model, encoded, beam=args.beam, top_k=args.beam,
                                                           precision=precision)
    }
    for n, (codes, _) in galleries.items():
        index = PrefixIndex.build(codes, sizes).to(device)
        fns[f"constrained N={n:,}"] = functools.partial(
            constrained_beam_search, model, encoded, index, beam=args.beam, top_k=args.beam, precision=precision
        )
    timings = measure(fns, device=device, warmup=args.warmup, repeats=args.repeats)
    qps = {k: args.batch / t.wall for k, t in timings.items()}
    qps_cpu = {k: args.batch / t.cpu for k, t in timings.items()}
    for k, t in timings.items():
        print(f"{k:>24}: {qps[k]:7.1f} queries/s wall ({t.wall * 1e3:7.1f} ms/batch), "
              f"{qps_cpu[k]:7.1f} queries per CPU-second ({t.cpu * 1e3:7.1f} CPU-ms/batch)")
    free = "unconstrained"
    for n in galleries:
        k = f"constrained N={n:,}"
        print(f"constrained/unconstrained N={n:,}: wall {qps[k] / qps[free]:.3f}, cpu {qps_cpu[k] / qps_cpu[free]:.3f}")
    if len(galleries) > 1:
        lo, hi = f"constrained N={min(galleries):,}", f"constrained N={max(galleries):,}"
        print(f"flatness N={max(galleries):,} / N={min(galleries):,}: wall {qps[hi] / qps[lo]:.3f}, "
              f"cpu {qps_cpu[hi] / qps_cpu[lo]:.3f}")
    print(f"load average after the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
