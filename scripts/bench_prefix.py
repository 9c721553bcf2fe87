"""Benchmark of the prefix index (CART, constrained decoding): build time and query latency.

Targets (2-core CPU): 1,000,000 random identifiers of length 4 build in < 10 s; a batch of 10,000
prefix states is answered (``allowed`` + ``advance``) in < 10 ms. Prints numbers; not a test.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_prefix.py [--n 1000000] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from cartlib.ids.prefix import PrefixIndex


def random_identifiers(n: int, sizes: tuple[int, ...], *, seed: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``n`` random identifiers: ``len(sizes)`` random semantic levels + a unique counter level."""
    g = torch.Generator().manual_seed(seed)
    sem = torch.stack([torch.randint(0, k, (n,), generator=g) for k in sizes], 1)  # (N, L-1)
    # unique token: rank of each row among the rows with the same semantic prefix
    key = torch.zeros(n, dtype=torch.long)
    for l, k in enumerate(sizes):
        key = key * k + sem[:, l]
    order = torch.sort(key, stable=True).indices
    sk = key[order]
    start = torch.ones(n, dtype=torch.bool)
    start[1:] = sk[1:] != sk[:-1]
    group_start = torch.cummax(torch.where(start, torch.arange(n), 0), 0).values
    u = torch.empty(n, dtype=torch.long)
    u[order] = torch.arange(n) - group_start
    codes = torch.cat([sem, u[:, None]], 1)
    return codes, (*sizes, int(u.max()) + 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 256, 256], help="semantic levels")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    device = torch.device(args.device)

    codes, sizes = random_identifiers(args.n, tuple(args.sizes), seed=0)
    codes = codes.to(device)
    builds = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        index = PrefixIndex.build(codes, sizes)
        sync(device)
        builds.append(time.perf_counter() - t0)
    print(f"{index!r}")
    print(f"build: N={args.n:,} L={len(sizes)} level_sizes={sizes} "
          f"median {statistics.median(builds):.3f} s (runs {', '.join(f'{b:.3f}' for b in builds)})")

    # states: the depth-l prefixes of random items (all alive), codes: a mix of valid and random
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, args.n, (args.batch,), generator=g).to(device)
    inv = torch.empty_like(index.perm)
    inv[index.perm] = torch.arange(args.n, device=device)
    per_level = []
    for level in range(len(sizes)):
        states = index.root(args.batch)
        for l in range(level):
            states = index.advance(states, l, codes[rows, l])
        assert bool((states >= 0).all())
        step = codes[rows, level].clone()
        step[::2] = torch.randint(0, sizes[level], (args.batch // 2 + args.batch % 2,), generator=g).to(device)
        times = []
        for r in range(args.repeats + 5):
            sync(device)
            t0 = time.perf_counter()
            mask = index.allowed(states, level)
            child = index.advance(states, level, step)
            sync(device)
            if r >= 5:  # warm-up
                times.append((time.perf_counter() - t0) * 1e3)
        t = index.levels[level]; kind = f"{'mask' if t.mask is not None else 'csr'}/{'table' if t.table is not None else 'search'} F={t.fanout}"
        med = statistics.median(times)
        per_level.append(med)
        print(f"level {level} [{kind:>16}]: allowed+advance on {args.batch:,} states: median {med:.3f} ms "
              f"(valid children {int((child >= 0).sum()):,}, mask {tuple(mask.shape)})")
    print(f"worst level: median {max(per_level):.3f} ms; mean over levels {statistics.mean(per_level):.3f} ms")
    assert bool((index.item_index(child) >= 0).any())


if __name__ == "__main__":
    main()
