"""What the throughput measurements say: the decoder's arithmetic, the crossover with exact search,
and the flat summary of the targets (CART, Fang et al., ACL 2025, Figure 4: CART's queries/s stay
flat as the gallery grows, dual-tower search slows down)."""
from __future__ import annotations

import math
from typing import NamedTuple

from cartlib.model.cart import CartModel, EncoderStates
from cartlib.model.fusion import FusionMode

__all__ = ["RATIO_BATCH", "GPU_BATCH", "mean_tokens", "decoder_flops_per_query", "ratio_batch", "crossover", "Summary",
           "summarise", "gpu_decode_rows", "gpu_summary"]

RATIO_BATCH = 100  # the paper's "100 concurrent queries": ratios use this batch size, or the closest
GPU_BATCH = 1024  # the GPU panel and GPU targets: this batch size, or the closest measured


def mean_tokens(encoded: EncoderStates) -> float:
    """Real (unpadded) encoder tokens per query of a batch."""
    return float(encoded.mask.float().sum(1).mean())


def decoder_flops_per_query(model: CartModel, *, n_tokens: float, beam: int) -> float:
    """Floating-point operations per query of the decoder, counted from its config: the encoder-side
    keys/values of every fusion cross-attention (once per query; ``n_tokens``: real encoder tokens per
    query, see :func:`mean_tokens`), then per level ``w_l`` beams
    (``w_l = min(beam, Π_{j<l} K_j)``) through every decoder layer (self-attention over the cached
    positions, the fusion's query/output/gate projections and attention over ``n_tokens`` encoder
    tokens, the FFN) and the level's output head. 2 FLOPs per multiply-add; softmax, norms and the
    beam bookkeeping are not counted (they are not matmuls), nor is attention over a single position
    (level 0's self-attention: the softmax is 1, :class:`cartlib.decode.BeamDecoder` skips it)."""
    d, s, de, t = model.d_model, model.n_enc_layers, model.d_enc, n_tokens
    d_ff = model.layers[0].ff[0].out_features
    mode = model.fusion_mode
    coarse = mode in (FusionMode.COARSE, FusionMode.TWO_BRANCH)
    fine = mode in (FusionMode.FINE, FusionMode.TWO_BRANCH)
    last = mode is FusionMode.LAST_LAYER
    mem = 0
    heads_dim = 0  # query width of all cross-attentions (in units of D)
    if coarse:
        mem += t * s * de * d + 2 * t * d * d  # Z = W_z [E_1..E_S], then its keys/values
        heads_dim += 1
    if fine:
        mem += 2 * s * t * de * d  # keys/values of every encoder layer
        heads_dim += s
    if last:
        mem += 2 * t * de * d
        heads_dim += 1
    macs = len(model.layers) * mem
    w = 1
    for level, k in enumerate(model.level_sizes):
        per_token = (4 * d * d + (2 * (level + 1) * d if level else 0)  # self-attention (+ over the cache)
                     + heads_dim * d * d + heads_dim * 2 * t * d  # fusion queries + attention
                     + (d * d if (coarse or last) else 0) + (d * d if coarse else 0)  # first-branch output, gate
                     + (s * d * d if fine else 0)  # α-mixed output of the fine branch
                     + 2 * d * d_ff)  # FFN
        macs += w * (len(model.layers) * per_token + d * k)
        w = min(beam, w * k)
    return 2.0 * macs


def ratio_batch(table, system: str) -> int | None:
    have = sorted(set(table.loc[(table["system"] == system) & table["qps"].notna(), "batch_size"]))
    return min(have, key=lambda b: (abs(b - RATIO_BATCH), b)) if have else None


def _qps(table, system: str, n: int, b: int) -> float:
    sel = table[(table["system"] == system) & (table["n_candidates"] == n) & (table["batch_size"] == b)]["qps"]
    return float(sel.iloc[0]) if len(sel) and sel.notna().iloc[0] else float("nan")


def crossover(table, *, batch_size: int, system: str = "cart_decode",
              baseline: str = "dual_tower_exact") -> tuple[float, float] | None:
    """Where ``system`` overtakes ``baseline`` as N grows, at ``batch_size``: the first pair of
    measured sizes with ``system`` slower, then faster, interpolated in log–log; ``(N, qps)`` or None."""
    ns = sorted(set(table["n_candidates"]))
    pts = [(n, _qps(table, system, n, batch_size), _qps(table, baseline, n, batch_size)) for n in ns]
    pts = [p for p in pts if not (math.isnan(p[1]) or math.isnan(p[2]))]
    for (n0, a0, b0), (n1, a1, b1) in zip(pts, pts[1:]):
        d0, d1 = math.log(a0 / b0), math.log(a1 / b1)
        if d0 < 0 <= d1:
            f = d0 / (d0 - d1)
            x = math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0)))
            y = math.exp(math.log(a0) + f * (math.log(a1) - math.log(a0)))
            return x, y
    return None


class Summary(NamedTuple):
    """``metrics``: what does not depend on this run's clock (the decoder's FLOPs, the gallery sizes,
    the rows); ``timings``: every wall-clock number and everything derived from one (queries/s, the
    ratios, the crossover, skips), never in metrics.json (DESIGN.md, result contracts)."""

    metrics: dict
    timings: dict


def summarise(table, *, flops_per_query: float, matmul_flops: float) -> Summary:
    """The targets as numbers (flat dicts; None where not measurable). In ``timings``:

    - ``constraint_overhead_ratio``: cart_decode / unconstrained_decode queries/s at the largest
      gallery, batch 100 (or the closest measured);
    - ``flatness_ratio``: cart_decode queries/s at the largest gallery / at the smallest, same batch;
    - ``crossover_n_candidates``: where cart_decode overtakes dual_tower_exact (None if it does not);
    - ``arithmetic_floor_fraction``: (decoder FLOPs per query / measured large-matmul rate) divided by
      the measured seconds per query of cart_decode at the largest gallery: the share of the
      device's matmul rate the decoder reaches (1 = at the arithmetic floor);
    - queries/s of each system at the largest gallery (CART also at the smallest), the matmul rate.
    """
    ns = sorted(set(table["n_candidates"]))
    b = ratio_batch(table, "cart_decode")
    metrics: dict = {"decoder_flops_per_query": flops_per_query, "ratio_batch_size": b,
                     "n_candidates_smallest": ns[0] if ns else None, "n_candidates_largest": ns[-1] if ns else None,
                     "n_rows": int(len(table))}
    timings: dict = {"matmul_gflops": matmul_flops / 1e9, "arithmetic_floor_qps": matmul_flops / flops_per_query,
                     "n_skipped": int(table["qps"].isna().sum()), "constraint_overhead_ratio": None,
                     "flatness_ratio": None, "crossover_n_candidates": None, "arithmetic_floor_fraction": None}
    if b is None or not ns:
        return Summary(metrics, timings)
    big, small = ns[-1], ns[0]
    cart_big, cart_small = _qps(table, "cart_decode", big, b), _qps(table, "cart_decode", small, b)
    free_big = _qps(table, "unconstrained_decode", big, b)
    exact_big = _qps(table, "dual_tower_exact", big, b)
    cross = crossover(table, batch_size=b)

    def num(x: float) -> float | None:
        return None if x is None or math.isnan(x) else float(x)

    timings.update({
        "cart_decode_qps_largest": num(cart_big), "cart_decode_qps_smallest": num(cart_small),
        "unconstrained_decode_qps_largest": num(free_big), "dual_tower_exact_qps_largest": num(exact_big),
        "cart_end_to_end_qps_largest": num(_qps(table, "cart_end_to_end", big, b)),
        "constraint_overhead_ratio": num(cart_big / free_big),
        "flatness_ratio": num(cart_big / cart_small),
        "cart_over_exact_qps_ratio_largest": num(cart_big / exact_big),
        "crossover_n_candidates": None if cross is None else int(round(cross[0])),
        "arithmetic_floor_fraction": num(cart_big * flops_per_query / matmul_flops),
    })
    return Summary(metrics, timings)


def gpu_decode_rows(gpu, *, batch_size: int | None = GPU_BATCH):
    """The measured ``decode`` rows from encoded queries of a GPU check table
    (:func:`cartlib.bench.measure.read_gpu_rows`), at ``batch_size`` or the closest measured (None:
    every batch)."""
    rows = gpu[(gpu["kind"] == "decode") & (gpu["input"] == "encoded") & gpu["qps"].notna()]
    if batch_size is None or not len(rows):
        return rows
    have = sorted(int(b) for b in set(rows["batch_size"].dropna()))
    b = min(have, key=lambda x: (abs(x - batch_size), -x))
    return rows[rows["batch_size"] == b]


def gpu_summary(gpu) -> dict:
    """Flat numbers of a GPU check table for timings.json (``gpu_`` keys; None where absent): the
    device, the targets' values and pass/fail, the agreement, the crossover at the panel's batch."""
    out: dict = {"gpu_rows": int(len(gpu))}
    dev = gpu.loc[gpu["kind"] == "decode", "device"]
    machine = gpu[(gpu["kind"] == "machine") & (gpu["name"] == "device")]
    out["gpu_device"] = (machine["note"].iloc[0] if len(machine) else dev.iloc[0] if len(dev) else None)
    for kind in ("target", "agreement", "check"):
        for r in gpu[gpu["kind"] == kind].itertuples():
            if r.name == "dual_tower_crossover_n":
                continue
            value = None if r.value != r.value else float(r.value)
            out[f"gpu_{r.name}"] = value
            if str(r.passed) in ("True", "False"):
                out[f"gpu_{r.name}_passed"] = str(r.passed) == "True"
    rows = gpu_decode_rows(gpu)
    if len(rows):
        b = int(rows["batch_size"].iloc[0])
        cross = crossover(rows.astype({"n_candidates": "float64"}), batch_size=b)
        out["gpu_panel_batch_size"] = b
        out["gpu_crossover_n_candidates"] = None if cross is None else int(round(cross[0]))
    return out
