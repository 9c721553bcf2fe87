"""Throughput of CART against dual-tower and FAISS search as the gallery grows (Figure 4 analogue).

CART (Fang et al., ACL 2025, Figure 4) reports that its queries/s stay flat as the number of
candidates grows (it generates identifiers: the cost is set by the identifier length and the beam,
not by N), while dual-tower search slows down with N. This module measures that claim.

Galleries. A gallery of N candidates is sampled from a distribution fitted to the task's real item
features (``data/<task>/features/items.npy``): per K-Means cluster of the real features (the coarse
clusters of the CART identifier model), a Gaussian with the cluster's mean, its top principal
directions (up to :data:`MIXTURE_RANK`, with their variances) and a per-dimension residual std, then
L2-normalised. Why this is fair:

- the identifiers come from the *real* CART identifier model of the task (its K-Means centroids
  and RQ-VAE, refit from the stage's config and seed, which reproduces the stage's table; see
  :func:`fit_identifier_model`), so the coarse-token distribution, the prefix fan-out, the
  collisions and the size of the unique-token level grow with N as they would on real data;
- the within-cluster covariance keeps the low intrinsic dimension of real features. A purely
  diagonal Gaussian per cluster spreads every cluster over all 384 dimensions: on the image task
  it drops HNSW's recall@10 from 0.99 (real features) to 0.5 at 60K items and makes IVF look worse
  than it is, an unfair handicap for the approximate baselines. With rank 32 the nearest-neighbour
  similarities, the IVF recall-vs-nprobe curve and HNSW recall match the real features closely.

Systems (the ``system`` column):

- ``cart_end_to_end``: MiniLM query encoding (pre-tokenised ids, so CPU and GPU rows compare;
  tokenising costs ~0.1 ms/query on a CPU; the batch encoded in length buckets,
  :func:`encode_bucketed`) + constrained beam search;
- ``cart_decode``: constrained beam search from precomputed encoder states (the decoder alone,
  encoder-side keys/values included);
- ``unconstrained_decode``: the same search without the prefix constraint (the decoding floor);
- ``dual_tower_exact``: exact inner-product top-k by torch matmul over the (N, D) features,
  chunked so the score block stays bounded, in the same dtype as CART (fp32 on CPU, fp16 on GPU);
- ``faiss_flat`` (IndexFlatIP), ``faiss_ivf`` (IndexIVFFlat, nlist ≈ 4√N, capped at N/39, nprobe
  calibrated), ``faiss_hnsw`` (IndexHNSWFlat, M = ``baselines.hnsw_m``, efSearch calibrated; only
  up to ``throughput.hnsw_max_candidates``). nprobe and efSearch are the smallest powers of two
  whose recall@10 against exact search reaches :data:`RECALL_TARGET` on the recall queries.
  ``recall_vs_exact`` is that top-10 overlap (1.0 for exact search, empty for CART).

The query encoder is the same MiniLM for every system: dual-tower systems start from the
precomputed caption features, exactly as ``cart_decode`` starts from precomputed encoder states,
so ``cart_decode`` vs ``dual_tower_exact`` is the like-for-like comparison (and the crossover).

Timing (:func:`time_interleaved`): one warm-up call, then ``repeats`` timed rounds in which every
system of a group runs once (interleaved, so a load spike hits them alike); the device is
synchronised around each call; queries/s is the median over the repeats of ``batch / seconds`` and
latency the median seconds per batch. A combination whose warm-up exceeds ``max_batch_seconds`` is
skipped (recorded with an empty qps, reason in ``skipped``); so is one predicted to exceed it from a
measured smaller gallery (linear-scan systems) or one whose smaller batch was skipped.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` around each call; on a CPU the process's
resident-set high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), reset before each
call through ``/proc/self/clear_refs`` where Linux allows it, so it is the peak *during* the batch,
everything resident included (gallery, index, model).

Decoder weights: ``models/<task>/cart.pt`` (through :func:`cartlib.stages.train.load_bundle`) for
the galleries whose level sizes match its identifier vocabulary; a larger gallery has a larger
unique-token level, so it gets a model of the trained config with random weights (throughput does
not depend on the weights; ``galleries.csv`` and the caption say which is which).

CART decoding uses :class:`FastDecoder`, an inference-only re-layout of :class:`CartModel`'s
decoder step (same weights, same maths as :func:`cartlib.decode.constrained_beam_search`, checked
by the tests): attention by plain batched matmuls instead of the CPU flash-attention kernel (slow
at these tiny shapes), the fusion's query projections fused into one, the fine branch's α-mixing
folded into its output projection once, encoder-side keys/values of real tokens only.
"""
from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cartlib.decode import GenerationOutput
from cartlib.ids.prefix import DEAD, PrefixIndex
from cartlib.model.cart import BOS, CartModel, EncoderStates
from cartlib.model.fusion import KV, FusionMode

__all__ = [
    "SYSTEMS", "COLUMNS", "CART_SYSTEMS", "FAISS_SYSTEMS", "MIXTURE_RANK", "RECALL_TARGET",
    "FeatureMixture", "fit_feature_mixture", "sample_features",
    "fit_identifier_model", "identify", "Gallery", "build_gallery",
    "FastDecoder", "encode_bucketed", "Decoder", "random_decoder",
    "QuerySet", "make_query_set",
    "PeakMemory", "Timing", "time_interleaved",
    "exact_topk", "recall_vs_exact",
    "GalleryResult", "measure_gallery",
    "mean_tokens", "decoder_flops_per_query", "matmul_flops_per_second", "device_name",
    "crossover", "summarise", "throughput_figure",
    "ThroughputResult", "run",
]

SYSTEMS = ("cart_end_to_end", "cart_decode", "unconstrained_decode", "dual_tower_exact",
           "faiss_flat", "faiss_ivf", "faiss_hnsw")
CART_SYSTEMS = SYSTEMS[:3]
FAISS_SYSTEMS = SYSTEMS[4:]
COLUMNS = ("system", "device", "n_candidates", "batch_size", "beam", "qps", "latency_ms_p50", "peak_mem_mb",
           "recall_vs_exact")
MIXTURE_RANK = 32  # principal directions kept per cluster when sampling galleries (module docstring)
RECALL_TARGET = 0.95  # IVF nprobe / HNSW efSearch: the smallest power of two reaching this recall@10
RATIO_BATCH = 100  # the paper's "100 concurrent queries": ratios use this batch size, or the closest
RECALL_QUERIES = 1000  # queries scored for recall_vs_exact and the FAISS calibration
SCORE_BLOCK_BYTES = 256 * 2**20  # dual-tower exact search: bound on one (B, chunk) score block (CPU)
# how a system's cost grows with N at a fixed batch (for predicting a skip from a smaller gallery)
_N_EXPONENT = {"dual_tower_exact": 1.0, "faiss_flat": 1.0, "faiss_ivf": 0.5}


# ====================================================================== galleries

class FeatureMixture(NamedTuple):
    """Per-cluster Gaussians fitted to real features (low-rank + diagonal covariance)."""

    weights: np.ndarray  # (C,) cluster frequencies
    means: np.ndarray  # (C, D)
    bases: np.ndarray  # (C, r, D) principal directions (rows; zero rows where a cluster has < r+1 items)
    scales: np.ndarray  # (C, r) std along each direction
    residual_std: np.ndarray  # (C, D) per-dimension std of what the r directions leave


def fit_feature_mixture(features: np.ndarray, labels: np.ndarray, *, rank: int = MIXTURE_RANK) -> FeatureMixture:
    """Fit one Gaussian per cluster ``labels (N,)`` of ``features (N, D)``: the cluster's mean, its top
    ``rank`` principal directions with their variances, and a per-dimension residual std."""
    x = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64)
    if x.ndim != 2 or len(x) != len(labels) or len(x) == 0:
        raise ValueError(f"features {x.shape} and labels {labels.shape} must be (N, D) and (N,) with N > 0")
    c, d = int(labels.max()) + 1, x.shape[1]
    weights = np.bincount(labels, minlength=c).astype(np.float64)
    means = np.zeros((c, d), np.float32)
    bases = np.zeros((c, rank, d), np.float32)
    scales = np.zeros((c, rank), np.float32)
    resid = np.zeros((c, d), np.float32)
    for k in range(c):
        rows = x[labels == k]
        if len(rows) == 0:
            continue
        means[k] = rows.mean(0)
        centred = (rows - means[k]).astype(np.float64)
        r = min(rank, len(rows) - 1)
        if r > 0:
            _, s, vt = np.linalg.svd(centred, full_matrices=False)
            bases[k, :r] = vt[:r]
            scales[k, :r] = s[:r] / math.sqrt(len(rows) - 1)
            centred = centred - (centred @ vt[:r].T) @ vt[:r]
        resid[k] = centred.std(0)
    return FeatureMixture(weights / weights.sum(), means, bases, scales, resid)


def sample_features(mixture: FeatureMixture, n: int, *, seed: int) -> np.ndarray:
    """``(n, D)`` float32 unit vectors drawn from ``mixture`` (cluster by its weight, then its Gaussian)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    c, d = mixture.means.shape
    cluster = rng.choice(c, size=n, p=mixture.weights)  # in random order: rows of a cluster are scattered
    out = np.empty((n, d), np.float32)
    for k in np.unique(cluster):
        rows = np.flatnonzero(cluster == k)
        z = rng.standard_normal((len(rows), mixture.scales.shape[1]), dtype=np.float32) * mixture.scales[k]
        x = z @ mixture.bases[k]
        x += rng.standard_normal((len(rows), d), dtype=np.float32) * mixture.residual_std[k]
        x += mixture.means[k]
        out[rows] = x
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def fit_identifier_model(features: np.ndarray, cfg, *, seed: int, device: str = "cpu", n_threads: int | None = 1,
                         progress: bool = False):
    """The task's CART identifier model (K-Means + residual RQ-VAE), fitted on the real item features
    with ``cfg`` (an :class:`~cartlib.config.IdentifiersConfig`) exactly as the `identifiers` stage
    fits it (same config, seed and thread count: the same codes on a CPU, which :func:`run` checks
    against the stage's table). The stage saves only the codes, not the fitted model."""
    from cartlib.ids import build_identifier_model

    model = build_identifier_model("cart", n_clusters=cfg.n_clusters, n_levels=cfg.n_levels,
                                   codebook_size=cfg.codebook_size, latent_dim=cfg.latent_dim,
                                   hidden_dim=cfg.hidden_dim, epochs=cfg.epochs, lr=cfg.lr, beta=cfg.beta,
                                   batch_size=cfg.batch_size, seed=seed, device=device,
                                   n_threads=n_threads, progress=progress)
    return model.fit(features)


def identify(model, features: np.ndarray, *, chunk: int = 262_144) -> tuple[np.ndarray, tuple[int, ...]]:
    """CART identifiers ``(k, v_1..v_M, u)`` of a new gallery under a fitted identifier model.

    The K-Means centroids and the RQ-VAE are the fitted ones; the collision-aware last RQ level
    (``model.last_level``) and the unique token ``u`` are assigned *within this gallery*, as
    ``fit`` would on it. Returns ``codes (N, L)`` int64 (rows unique) and the level sizes.
    """
    from cartlib.ids import unique_token
    from cartlib.ids.kmeans import nearest_center
    from cartlib.ids.rqvae import LastLevel, balanced_last_codes, group_ids

    x = np.asarray(features, dtype=np.float32)
    n = len(x)
    centers = model.cluster_centers_
    k = np.empty(n, np.int64)
    v = np.empty((n, model.n_levels), np.int64)
    cost = None
    for lo in range(0, n, chunk):
        part = x[lo:lo + chunk]
        k[lo:lo + chunk] = nearest_center(part, centers)
        enc = model.rqvae_.encode(part - centers[k[lo:lo + chunk]])
        v[lo:lo + chunk] = enc.codes
        if cost is None:
            cost = np.empty((n, enc.last_cost.shape[1]), np.float32)
        cost[lo:lo + chunk] = enc.last_cost
    if model.last_level is LastLevel.BALANCED:
        v[:, -1] = balanced_last_codes(group_ids(np.column_stack([k, v[:, :-1]])), cost)
    prefix = np.column_stack([k, v])
    codes = np.column_stack([prefix, unique_token(prefix)]).astype(np.int64)
    base = (model.n_clusters,) + (model.codebook_size,) * model.n_levels
    sizes = tuple(max(a, int(b) + 1) for a, b in zip(base, prefix.max(0))) + (int(codes[:, -1].max()) + 1,)
    return codes, sizes


class Gallery(NamedTuple):
    """One gallery of the benchmark: sampled features, their CART identifiers and prefix index."""

    n_candidates: int
    features: np.ndarray  # (N, D) float32 unit rows
    codes: np.ndarray  # (N, L) int64
    level_sizes: tuple[int, ...]
    index: PrefixIndex  # on the CPU
    build_seconds: float


def build_gallery(mixture: FeatureMixture, identifier_model, n: int, *, seed: int) -> Gallery:
    """Sample ``n`` candidates from ``mixture``, identify them, index the identifiers."""
    t0 = time.perf_counter()
    feats = sample_features(mixture, n, seed=seed)
    codes, sizes = identify(identifier_model, feats)
    index = PrefixIndex.build(torch.from_numpy(codes), sizes)
    return Gallery(n, feats, codes, sizes, index, time.perf_counter() - t0)


# ====================================================================== fast decoding

class _LayerWeights(NamedTuple):
    ln_self: tuple
    qkv: tuple[Tensor, Tensor]
    self_out: tuple[Tensor, Tensor]
    ln_cross: tuple
    q: tuple[Tensor, Tensor]  # fused query projection of every cross-attention of the layer
    n_first: int  # heads of the first branch (coarse or last-layer) in the fused queries; 0 = none
    first_out: tuple[Tensor, Tensor] | None
    gate: tuple[Tensor, Tensor] | None  # coarse branch's self-gate
    fine_out: tuple[Tensor, Tensor] | None  # α-mixed output projection of the fine branch
    ln_ff: tuple
    ff1: tuple[Tensor, Tensor]
    ff2: tuple[Tensor, Tensor]


def _ln(m) -> tuple:
    return (m.normalized_shape, m.weight, m.bias, m.eps)


def _lin(m) -> tuple[Tensor, Tensor]:
    return (m.weight, m.bias)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Softmax attention by two batched matmuls; ``q (..., Tq, Dh)``, ``k, v (..., T, Dh)``."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    return torch.matmul(torch.softmax(s, -1, dtype=torch.float32).to(v.dtype), v)


class FastDecoder:
    """Inference-only re-layout of a :class:`CartModel` decoder for beam search (CART, Fang et al.,
    ACL 2025: constrained decoding over the identifier prefix tree).

    Same weights and the same maths as :meth:`CartModel.step` driven by
    :func:`cartlib.decode.constrained_beam_search` (the tests hold it to that function and to
    :func:`cartlib.decode.exhaustive_scores`); what changes is the layout:

    - the cross-attention and self-attention are plain batched matmuls (``torch``'s CPU
      flash-attention kernel costs ~5 ms per call at batch 100 at these shapes: a handful of
      decoder positions per query, ~25 encoder tokens);
    - the coarse and fine branches' query projections are one matmul, and the fine branch's
      α-mixing is folded into its output projection once (the model refolds it at every step);
    - the encoder-side keys/values skip padding tokens (:meth:`memory`);
    - the beam bookkeeping is that of :mod:`cartlib.decode`, unchanged.

    Measured on one core of the 2-core CPU (CPU time, d_model 256, beam 10, caption queries):
    ~1.2x the reference at batch 100, ~1.1-1.6x at batch 1. It holds the model's weights at
    construction (the folded ones as copies): build it after loading them, in eval mode.
    """

    PACK_BELOW = 0.9  # pack the encoder-side keys/values when real tokens fill less than this share

    def __init__(self, model: CartModel) -> None:
        if model.training:
            raise ValueError("FastDecoder needs the model in eval mode (model.eval())")
        self.model = model
        self.n_heads = model.n_heads
        d = model.d_model
        layers = []
        with torch.no_grad():
            for layer in model.layers:
                fu = layer.fusion
                qw, qb = [], []
                first_out = gate = fine_out = None
                n_first = 0
                first = fu.last_attn if fu.last_attn is not None else fu.coarse_attn
                if first is not None:
                    qw.append(first.q_proj.weight)
                    qb.append(first.q_proj.bias)
                    first_out, n_first = _lin(first.out_proj), self.n_heads
                    if fu.coarse_gate is not None and first is fu.coarse_attn:
                        gate = _lin(fu.coarse_gate)
                if fu.fine is not None:
                    s = fu.fine.n_layers
                    qw.append(fu.fine.q_weight.reshape(s * d, d))
                    qb.append(fu.fine.q_bias.reshape(s * d))
                    alpha = fu.fine.alpha()  # (S, D)
                    fine_out = ((alpha[:, :, None] * fu.fine.o_weight).permute(1, 0, 2).reshape(d, s * d).contiguous(),
                                (alpha * fu.fine.o_bias).sum(0))
                layers.append(_LayerWeights(
                    ln_self=_ln(layer.ln_self), qkv=_lin(layer.self_attn.qkv), self_out=_lin(layer.self_attn.out_proj),
                    ln_cross=_ln(layer.ln_cross), q=(torch.cat(qw).contiguous(), torch.cat(qb).contiguous()),
                    n_first=n_first, first_out=first_out, gate=gate, fine_out=fine_out, ln_ff=_ln(layer.ln_ff),
                    ff1=_lin(layer.ff[0]), ff2=_lin(layer.ff[2])))
        self.layers = tuple(layers)
        self.ln_f = _ln(model.ln_f)

    def memory(self, encoded: EncoderStates) -> tuple[tuple, Tensor]:
        """Encoder-side keys/values per layer ``(first branch KV | None, fine KV | None)`` and the
        additive mask ``(B, 1, 1, T)`` (0 = token, -inf = padding).

        A batch pads every query to its longest, and the keys/values of padding are masked out
        anyway; when more than :attr:`PACK_BELOW` of the batch is padding, they are computed for
        the real tokens only (packed) and scattered into zeros, which the mask hides the same way.
        With caption-like queries this roughly halves the encoder-side cost at batch 100."""
        mask = encoded.mask.bool()
        bias = torch.zeros(mask.shape, dtype=encoded.layers.dtype, device=mask.device).masked_fill(~mask, -math.inf)
        s, b, t, de = encoded.layers.shape
        real = mask.reshape(-1).nonzero().squeeze(1)  # (M,) one host sync per search, outside the loop
        if real.numel() >= self.PACK_BELOW * b * t:
            mem = self.model.memory(encoded)
            kv = tuple((m.last if m.last is not None else m.coarse, m.fine) for m in mem.layers)
            return kv, bias[:, None, None, :]
        packed = encoded.layers.reshape(s, b * t, de).index_select(1, real)  # (S, M, De)
        rows, cols = real // t, real % t  # each real token's query and position
        h, d = self.n_heads, self.model.d_model
        concat = None  # (M, S*De): the coarse branch's input, shared by the layers

        def spread(x: Tensor, heads: int) -> Tensor:
            """(G, M, D) rows of real tokens -> (B, G*heads, T, Dh), zeros at padding; written
            straight into the attention layout (one scatter, no zero-filled intermediate)."""
            g = x.shape[0]
            full = x.new_zeros(b, g, heads, t, x.shape[-1] // heads)
            full.permute(1, 0, 3, 2, 4)[:, rows, cols] = x.view(g, -1, heads, x.shape[-1] // heads)
            return full.view(b, g * heads, t, -1)

        kv = []
        for layer in self.model.layers:
            fu = layer.fusion
            first = fine = None
            if fu.coarse_attn is not None or fu.last_attn is not None:
                att = fu.coarse_attn if fu.coarse_attn is not None else fu.last_attn
                if fu.coarse_attn is not None and concat is None:
                    concat = packed.permute(1, 0, 2).reshape(-1, s * de)
                e = fu.coarse_proj(concat) if fu.coarse_attn is not None else packed[-1]
                first = KV(spread(att.k_proj(e)[None], h), spread(att.v_proj(e)[None], h))
            if fu.fine is not None:
                ex = fu.fine
                fine = KV(spread(torch.baddbmm(ex.k_bias[:, None, :], packed, ex.k_weight.transpose(1, 2)), h),
                          spread(torch.baddbmm(ex.v_bias[:, None, :], packed, ex.v_weight.transpose(1, 2)), h))
            kv.append((first, fine))
        return tuple(kv), bias[:, None, None, :]

    def step(self, kv: tuple, bias: Tensor, cache: list | None, tokens: Tensor, level: int) -> tuple[Tensor, list]:
        """One level for ``tokens (B, W)`` (BOS or the previous codes' tokens) -> logits ``(B, W, K_level)``
        and the self-attention cache ``[(k, v) (B*W, H, t, Dh)]`` per layer."""
        m = self.model
        b, w = tokens.shape
        h, d = self.n_heads, m.d_model
        dh = d // h
        scale = 1.0 / math.sqrt(dh)
        x = F.embedding(tokens, m.tok_emb.weight) + m.pos_emb.weight[level]  # (B, W, D)
        new_cache = []
        for i, (lw, (first, fine)) in enumerate(zip(self.layers, kv)):
            qkv = F.linear(F.layer_norm(x, *lw.ln_self), *lw.qkv).view(b * w, 3, h, 1, dh)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B*W, H, 1, Dh)
            if cache is not None:
                k, v = torch.cat((cache[i][0], k), 2), torch.cat((cache[i][1], v), 2)
            new_cache.append((k, v))
            att = v if k.shape[2] == 1 else _attend(q, k, v, None, scale)  # one position: softmax = 1
            x = x + F.linear(att.reshape(b, w, d), *lw.self_out)
            q = F.linear(F.layer_norm(x, *lw.ln_cross), *lw.q)  # (B, W, G*D)
            q = q.view(b, w, -1, dh).transpose(1, 2)  # (B, G heads, W, Dh): beams of a query share its memory
            out = None
            if lw.n_first:
                a = _attend(q[:, :lw.n_first], first.k, first.v, bias, scale).transpose(1, 2).reshape(b, w, d)
                out = F.linear(a, *lw.first_out)
                if lw.gate is not None:
                    out = torch.sigmoid(F.linear(out, *lw.gate)) * out
            if lw.fine_out is not None:
                a = _attend(q[:, lw.n_first:], fine.k, fine.v, bias, scale).transpose(1, 2).reshape(b, w, -1)
                f = F.linear(a, *lw.fine_out)
                out = f if out is None else out + f
            x = x + out
            x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, *lw.ln_ff), *lw.ff1)), *lw.ff2)
        lo = m.offsets[level]
        hi = lo + m.level_sizes[level]
        logits = F.linear(F.layer_norm(x, *self.ln_f), m.head.weight[lo:hi], m.head.bias[lo:hi])
        return logits, new_cache

    def search(self, encoded: EncoderStates, index: PrefixIndex | None, *, beam: int, top_k: int,
               constrained: bool = True) -> GenerationOutput:
        """Beam search, constrained by ``index`` (``constrained=True``) or not; the output of
        :func:`cartlib.decode.constrained_beam_search` / :func:`~cartlib.decode.unconstrained_beam_search`
        (without ``prefix_index``: ``items`` all -1)."""
        model = self.model
        b = encoded.mask.shape[0]
        if b == 0:
            raise ValueError("no queries to decode (empty batch)")
        if not 1 <= top_k <= beam:
            raise ValueError(f"need 1 <= top_k <= beam, got top_k={top_k}, beam={beam}")
        if constrained:
            if index is None:
                raise ValueError("constrained search needs a prefix index")
            if tuple(index.level_sizes) != tuple(model.level_sizes):
                raise ValueError(f"prefix index level sizes {index.level_sizes} != model's {model.level_sizes}")
            if top_k > index.n_items:
                raise ValueError(f"top_k={top_k} exceeds the number of valid identifiers ({index.n_items})")
        device = encoded.layers.device
        depth = model.depth
        with torch.inference_mode():
            kv, bias = self.memory(encoded)
            scores = torch.zeros(b, 1, device=device)  # (B, W)
            codes = torch.zeros(b, 1, 0, dtype=torch.long, device=device)  # (B, W, l)
            states = index.root(b)[:, None] if constrained else None
            rows_base = torch.arange(b, device=device)[:, None]
            tokens = torch.full((b, 1), BOS, dtype=torch.long, device=device)
            cache = None
            for level in range(depth):
                k = model.level_sizes[level]
                logits, new_cache = self.step(kv, bias, cache, tokens, level)
                logp = torch.log_softmax(logits.float(), -1)  # (B, W, K)
                w = logp.shape[1]
                if constrained:
                    allowed = index.allowed(states.reshape(-1), level).view(b, w, k)
                    logp = logp.masked_fill(~allowed, -math.inf)
                cand = (scores[:, :, None] + logp).view(b, w * k)
                w_new = min(beam, w * k)
                scores, flat = cand.topk(w_new, dim=1)
                parent = torch.div(flat, k, rounding_mode="floor")
                code = flat - parent * k
                codes = torch.cat((codes.gather(1, parent[:, :, None].expand(-1, -1, level)), code[:, :, None]), 2)
                if constrained:
                    states = index.advance(states.gather(1, parent).reshape(-1), level, code.reshape(-1)).view(b, w_new)
                if level + 1 < depth:
                    keep = (rows_base * w + parent).reshape(-1)
                    cache = [(ck.index_select(0, keep), cv.index_select(0, keep)) for ck, cv in new_cache]
                    tokens = code + model.offsets[level]
            scores, codes = scores[:, :top_k], codes[:, :top_k]
            alive = scores > -math.inf
            if constrained:
                items = index.item_index(states[:, :top_k].masked_fill(~alive, DEAD))
            else:
                items = torch.full_like(scores, DEAD, dtype=torch.long)
            codes = codes.masked_fill(~alive[:, :, None], DEAD)
        return GenerationOutput(items=items, scores=scores, codes=codes)


def encode_bucketed(model: CartModel, input_ids: Tensor, attention_mask: Tensor, *, bucket: int = 32) -> EncoderStates:
    """:meth:`CartModel.encode` of a batch sorted by length in buckets of ``bucket`` queries, each
    padded only to its own longest (what sentence-transformers does), reassembled in the batch's
    order and padded to its longest with zeros (masked, as padding always is). The outputs at real
    tokens are the same as one padded call's; queries of mixed lengths cost less."""
    b = input_ids.shape[0]
    lengths = attention_mask.sum(1)
    if b <= bucket:
        return model.encode(input_ids, attention_mask)
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    parts = []
    for lo in range(0, b, bucket):
        idx = order[lo:lo + bucket]
        t = max(int(sorted_lengths[min(lo + bucket, b) - 1]), 1)
        parts.append((idx, model.encode(input_ids[idx, :t], attention_mask[idx, :t]).layers))
    s, _, _, d = parts[0][1].shape
    layers = parts[0][1].new_zeros(s, b, attention_mask.shape[1], d)
    for idx, part in parts:
        layers[:, idx, :part.shape[2]] = part
    return EncoderStates(layers, attention_mask.bool())


class Decoder(NamedTuple):
    """A CART model for one gallery's level sizes, with its fast decoding path."""

    model: CartModel
    fast: FastDecoder
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
    return Decoder(model, FastDecoder(model), weights)


# ====================================================================== queries

class QuerySet(NamedTuple):
    """The benchmark's queries, ``n = max(batch sizes)`` of them: tokens for the encoder, the same
    queries' caption features for the dual-tower systems."""

    input_ids: Tensor  # (n, T) on the device
    attention_mask: Tensor  # (n, T) on the device
    vectors: np.ndarray  # (n, D) float32 unit rows (the same queries' features)

    def batch(self, size: int) -> tuple[Tensor, Tensor]:
        """Tokens of the first ``size`` queries, padded to their own longest."""
        mask = self.attention_mask[:size]
        t = max(int(mask.sum(1).max()), 1)
        return self.input_ids[:size, :t], mask[:size, :t]


def make_query_set(texts: Sequence[str] | None, vectors: np.ndarray, *, n: int, seed: int, tokenizer=None,
                   max_length: int = 48, device: str | torch.device = "cpu", token_ids: Tensor | None = None,
                   token_mask: Tensor | None = None) -> QuerySet:
    """``n`` queries drawn (seeded, cycling when fewer exist) from ``texts`` (tokenised with
    ``tokenizer``) and their ``vectors``; or from pre-tokenised ``token_ids``/``token_mask`` (one row
    per vector; no tokenizer needed)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(vectors) == 0:
        raise ValueError("no queries")
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(len(vectors)) for _ in range(-(-n // len(vectors)))])[:n]
    if token_ids is None:
        if tokenizer is None or texts is None:
            raise ValueError("need texts and a tokenizer, or token_ids and token_mask")
        enc = tokenizer([texts[i] for i in pick], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        if token_mask is None or len(token_ids) != len(vectors) or token_mask.shape != token_ids.shape:
            raise ValueError(f"token_ids and token_mask must have one row per vector ({len(vectors)})")
        ids, mask = token_ids[torch.as_tensor(pick)], token_mask[torch.as_tensor(pick)]
    return QuerySet(ids.to(device), mask.to(device), np.ascontiguousarray(vectors[pick]))


# ====================================================================== timing

RETAIN_BYTES = 256 * 2**20  # freed blocks below this stay in the process (see retain_freed_memory)


def retain_freed_memory(limit: int = RETAIN_BYTES) -> bool:
    """Keep freed heap blocks of up to ``limit`` bytes in the process instead of returning them to
    the OS (glibc ``mallopt`` M_MMAP_THRESHOLD and M_TRIM_THRESHOLD); False where that is not glibc.

    Why: by default glibc maps blocks above a dynamic threshold (128 KiB, rising to at most 32 MiB)
    afresh with ``mmap`` and unmaps them when freed, and trims the heap's free top back to the OS,
    so the activations of each decoding step (a few MB at batch 100) are page-faulted in and zeroed
    by the kernel again: ~10,000 minor faults per batch of 100 queries here, none with this. The
    same reason PyTorch's CPU tuning guides swap in jemalloc/tcmalloc. It is process-wide, so every
    system timed in the process (CART, dual tower, FAISS) gets it alike. Peak RSS may read higher."""
    if sys.platform != "linux":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(limit))) and bool(mallopt(m_trim_threshold, int(limit)))


class PeakMemory:
    """Peak memory of one call: CUDA ``max_memory_allocated``, or the CPU process's RSS high-water
    mark (``getrusage``), reset through ``/proc/self/clear_refs`` where the kernel allows."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = False
        if not self.cuda:
            self.resettable = self._clear_refs()
        if self.cuda:
            self.kind = "CUDA max_memory_allocated during the batch"
        elif self.resettable:
            self.kind = "process RSS high-water during the batch (getrusage ru_maxrss, reset via /proc/self/clear_refs)"
        else:
            self.kind = "process RSS high-water since start (getrusage ru_maxrss; no reset on this OS)"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_refs()

    def read_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class Timing(NamedTuple):
    """One (system, batch) measurement."""

    qps: float  # median over the repeats of batch / seconds; NaN when skipped
    latency_ms_p50: float  # median milliseconds per batch; NaN when skipped
    peak_mem_mb: float  # max over the calls; NaN when skipped
    seconds: tuple[float, ...]  # the timed repeats
    warmup_seconds: float  # NaN when skipped before running
    skipped: str  # "" or why it was skipped


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, batch_size: int, repeats: int,
                     max_batch_seconds: float, device: str | torch.device = "cpu",
                     memory: PeakMemory | None = None, skip: Mapping[str, str] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time each ``fn()`` (one batch of ``batch_size`` queries): one warm-up call each, then
    ``repeats`` rounds in which every function runs once (interleaved). A function whose warm-up
    takes longer than ``max_batch_seconds``, or named in ``skip`` (name -> reason), is skipped.
    The device is synchronised before and after every call; ``clock`` is injectable for tests."""
    device = torch.device(device)
    skip = dict(skip or {})
    nan = float("nan")
    warm: dict[str, float] = {}
    peaks: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in fns}

    def call(name: str) -> float:
        if memory is not None:
            memory.reset()
        _sync(device)
        t0 = clock()
        fns[name]()
        _sync(device)
        dt = clock() - t0
        if memory is not None:
            peaks[name] = max(peaks.get(name, 0.0), memory.read_mb())
        return dt

    for name in fns:
        if name in skip:
            continue
        warm[name] = call(name)
        if warm[name] > max_batch_seconds:
            skip[name] = f"warm-up batch took {warm[name]:.1f} s > max_batch_seconds={max_batch_seconds:g}"
    live = [name for name in fns if name not in skip]
    for _ in range(repeats):
        for name in live:
            times[name].append(call(name))
    out = {}
    for name in fns:
        if name in skip:
            out[name] = Timing(nan, nan, nan, (), warm.get(name, nan), skip[name])
            continue
        secs = times[name]
        out[name] = Timing(qps=statistics.median(batch_size / max(t, 1e-12) for t in secs),
                           latency_ms_p50=statistics.median(secs) * 1e3,
                           peak_mem_mb=peaks.get(name, nan), seconds=tuple(secs), warmup_seconds=warm[name],
                           skipped="")
    return out


# ====================================================================== dual-tower and FAISS

def exact_topk(gallery: Tensor, queries: Tensor, k: int, *, block_bytes: int = SCORE_BLOCK_BYTES) -> tuple[Tensor, Tensor]:
    """Exact inner-product top-``k`` of ``queries (B, D)`` over ``gallery (N, D)`` (same dtype and
    device): matmul + topk over gallery chunks whose ``(B, chunk)`` score block stays within
    ``block_bytes``, merged. Returns ``(scores, indices)`` ``(B, k)``, best first."""
    n, b = gallery.shape[0], queries.shape[0]
    k = min(k, n)
    chunk = max(4096, block_bytes // max(1, b * gallery.element_size()))
    best_s = best_i = None
    with torch.inference_mode():
        for lo in range(0, n, chunk):
            s = queries @ gallery[lo:lo + chunk].T  # (B, c)
            ts, ti = s.topk(min(k, s.shape[1]), dim=1)
            ti = ti + lo
            if best_s is None:
                best_s, best_i = ts, ti
            else:
                ms, pos = torch.cat((best_s, ts), 1).topk(k, dim=1)
                best_i = torch.cat((best_i, ti), 1).gather(1, pos)
                best_s = ms
    return best_s, best_i


def recall_vs_exact(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean top-k overlap (order ignored) of ``found (Q, k)`` with the exact ``exact (Q, k)``."""
    found, exact = np.asarray(found), np.asarray(exact)
    hits = (found[:, :, None] == exact[:, None, :]).any(2) & (found >= 0)
    return float(hits.sum(1).mean() / exact.shape[1])


def _ivf_nlist(n: int) -> int:
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))  # FAISS wants >= 39 training points per list


def _calibrate(index, knob: Callable[[int], None], ladder: Iterable[int], queries: np.ndarray, exact: np.ndarray,
               k: int) -> tuple[int, float]:
    """The first ``ladder`` value whose recall@k reaches :data:`RECALL_TARGET` (else the last one)."""
    value, rec = 0, 0.0
    for value in ladder:
        knob(value)
        rec = recall_vs_exact(index.search(queries, k)[1], exact)
        if rec >= RECALL_TARGET:
            break
    return value, rec


def _faiss_index(name: str, feats: np.ndarray, *, seed: int, hnsw_m: int, recall_queries: np.ndarray,
                 exact: np.ndarray, k: int) -> tuple[object, dict, float]:
    """Build one FAISS index; returns it, its settings and its recall vs exact search."""
    import faiss

    d = feats.shape[1]
    info: dict = {}
    if name == "faiss_flat":
        index = faiss.IndexFlatIP(d)
        index.add(feats)
    elif name == "faiss_ivf":
        nlist = _ivf_nlist(len(feats))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.niter = 10  # 1M items: 4,000 lists; FAISS's 25 iterations would take minutes on 2 cores
        train = feats
        if len(feats) > 40 * nlist:  # FAISS wants 39-256 points per list; more only slows training
            train = feats[np.random.default_rng(seed).choice(len(feats), 40 * nlist, replace=False)]
        index.train(train)
        index.add(feats)
        ladder = [p for p in (2 ** i for i in range(20)) if p < nlist] + [nlist]
        nprobe, _ = _calibrate(index, lambda v: setattr(index, "nprobe", v), ladder, recall_queries, exact, k)
        index.nprobe = nprobe
        info = {"ivf_nlist": nlist, "ivf_nprobe": nprobe}
    elif name == "faiss_hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.add(feats)
        ladder = [max(k, 16) * 2 ** i for i in range(7)]
        ef, _ = _calibrate(index, lambda v: setattr(index.hnsw, "efSearch", v), ladder, recall_queries, exact, k)
        index.hnsw.efSearch = ef
        info = {"hnsw_m": hnsw_m, "hnsw_ef_search": ef}
    else:
        raise ValueError(f"unknown FAISS system {name!r}")
    return index, info, recall_vs_exact(index.search(recall_queries, k)[1], exact)


# ====================================================================== one gallery

class GalleryResult(NamedTuple):
    rows: list[dict]  # COLUMNS, one per (system, batch) (skipped: qps etc. NaN)
    skipped: list[dict]  # system, n_candidates, batch_size, reason
    info: dict  # gallery facts: level sizes, decoder weights, build seconds, FAISS settings
    warmups: dict  # (system, N, batch) -> warm-up seconds, None if skipped (predicts skips at larger N)


def _predicted_skips(system: str, n: int, batch_sizes: Sequence[int], history: Mapping, max_seconds: float) -> dict:
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


def measure_gallery(gallery: Gallery, *, decoder: Decoder, queries: QuerySet, states: Mapping[int, EncoderStates],
                    cfg, device: str | torch.device, dtype: torch.dtype, device_label: str,
                    systems: Sequence[str] = SYSTEMS, hnsw_m: int = 32, seed: int = 0,
                    history: Mapping | None = None, memory: PeakMemory | None = None,
                    progress: bool = False) -> GalleryResult:
    """Time every system of ``systems`` on ``gallery`` at every batch size of ``cfg`` (a
    :class:`~cartlib.config.ThroughputConfig`); ``states[B]``: the first B queries' encoder states
    under ``decoder``'s encoder. Systems are timed in groups that share what they build (CART: the
    model and prefix index; each FAISS index is built, timed and freed in turn)."""
    from tqdm.auto import tqdm

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
        pre = {name: _predicted_skips(name, n, batches, {**history, **warmups}, cfg.max_batch_seconds)
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
            fast, model = decoder.fast, decoder.model

            def end_to_end(b: int) -> Callable[[], object]:
                ids, mask = queries.batch(b)

                def fn():
                    with torch.inference_mode():
                        return fast.search(encode_bucketed(model, ids, mask), index, beam=cfg.beam, top_k=k)
                return fn

            makers = {"cart_end_to_end": end_to_end,
                      "cart_decode": lambda b: lambda: fast.search(states[b], index, beam=cfg.beam, top_k=k),
                      "unconstrained_decode": lambda b: lambda: fast.search(states[b], None, beam=cfg.beam, top_k=k,
                                                                            constrained=False)}
            run_group({s: makers[s] for s in cart}, {}, bar)
            del index
        # -- exact dual-tower search (torch), also the reference of recall_vs_exact
        exact_ids = None
        if "dual_tower_exact" in wanted or faiss_here:
            gal = torch.from_numpy(gallery.features).to(device=device, dtype=dtype)
            qv = torch.from_numpy(queries.vectors).to(device=device, dtype=dtype)
            block = SCORE_BLOCK_BYTES if device.type == "cpu" else 4 * SCORE_BLOCK_BYTES
            exact_ids = torch.cat([exact_topk(gal, qv[lo:lo + 256], k, block_bytes=block)[1]
                                   for lo in range(0, n_rec, 256)]).cpu().numpy()
            if "dual_tower_exact" in wanted:
                run_group({"dual_tower_exact": lambda b: lambda: exact_topk(gal, qv[:b], k, block_bytes=block)},
                          {"dual_tower_exact": 1.0}, bar)
            del gal, qv
        # -- FAISS (CPU only), one index at a time
        if faiss_here:
            import faiss

            faiss.omp_set_num_threads(torch.get_num_threads())  # the same threads as torch
            for name in faiss_here:
                t0 = time.perf_counter()
                index, settings, recall = _faiss_index(name, gallery.features, seed=seed, hnsw_m=hnsw_m,
                                                       recall_queries=rec_q, exact=exact_ids, k=k)
                info.update(settings)
                info[f"{name}_build_seconds"] = round(time.perf_counter() - t0, 2)
                info[f"{name}_recall_vs_exact"] = round(recall, 4)
                run_group({name: lambda b, index=index: (lambda: index.search(queries.vectors[:b], k))},
                          {name: recall}, bar)
                del index
    return GalleryResult(rows, skipped, info, warmups)


# ====================================================================== analysis

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
    (level 0's self-attention: the softmax is 1, :class:`FastDecoder` skips it)."""
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


def matmul_flops_per_second(*, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                            size: int | None = None, repeats: int = 5) -> float:
    """Measured rate of a large square matmul on ``device`` (median of ``repeats`` after a warm-up)."""
    device = torch.device(device)
    size = size or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        for r in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            if r:
                times.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / statistics.median(times)


def device_name(device: str | torch.device) -> str:
    """``torch.cuda.get_device_name()`` on CUDA, else ``cpu-<n>core`` with n = torch's threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{torch.get_num_threads()}core"


def _ratio_batch(table, system: str) -> int | None:
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


def summarise(table, *, flops_per_query: float, matmul_flops: float) -> dict:
    """The targets as numbers (a flat dict; None where not measurable):

    - ``constraint_overhead_ratio``: cart_decode / unconstrained_decode queries/s at the largest
      gallery, batch 100 (or the closest measured);
    - ``flatness_ratio``: cart_decode queries/s at the largest gallery / at the smallest, same batch;
    - ``crossover_n_candidates``: where cart_decode overtakes dual_tower_exact (None if it does not);
    - ``arithmetic_floor_fraction``: (decoder FLOPs per query / measured large-matmul rate) divided by
      the measured seconds per query of cart_decode at the largest gallery: the share of the
      device's matmul rate the decoder reaches (1 = at the arithmetic floor).
    """
    out: dict = {"decoder_flops_per_query": flops_per_query, "matmul_gflops": matmul_flops / 1e9,
                 "arithmetic_floor_qps": matmul_flops / flops_per_query}
    ns = sorted(set(table["n_candidates"]))
    b = _ratio_batch(table, "cart_decode")
    out["ratio_batch_size"] = b
    out["n_candidates_smallest"], out["n_candidates_largest"] = (ns[0], ns[-1]) if ns else (None, None)
    out["n_rows"] = int(len(table))
    out["n_skipped"] = int(table["qps"].isna().sum())
    none = {"constraint_overhead_ratio": None, "flatness_ratio": None, "crossover_n_candidates": None,
            "arithmetic_floor_fraction": None}
    if b is None or not ns:
        return {**out, **none}
    big, small = ns[-1], ns[0]
    cart_big, cart_small = _qps(table, "cart_decode", big, b), _qps(table, "cart_decode", small, b)
    free_big = _qps(table, "unconstrained_decode", big, b)
    exact_big = _qps(table, "dual_tower_exact", big, b)
    cross = crossover(table, batch_size=b)

    def num(x: float) -> float | None:
        return None if x is None or math.isnan(x) else float(x)

    out.update({
        "cart_decode_qps_largest": num(cart_big), "cart_decode_qps_smallest": num(cart_small),
        "unconstrained_decode_qps_largest": num(free_big), "dual_tower_exact_qps_largest": num(exact_big),
        "cart_end_to_end_qps_largest": num(_qps(table, "cart_end_to_end", big, b)),
        "constraint_overhead_ratio": num(cart_big / free_big),
        "flatness_ratio": num(cart_big / cart_small),
        "cart_over_exact_qps_ratio_largest": num(cart_big / exact_big),
        "crossover_n_candidates": None if cross is None else int(round(cross[0])),
        "arithmetic_floor_fraction": num(cart_big * flops_per_query / matmul_flops),
    })
    return out


_STYLE = {"cart_end_to_end": ("#1f77b4", "o"), "cart_decode": ("#d62728", "o"), "unconstrained_decode": ("#ff9896", "v"),
          "dual_tower_exact": ("#2ca02c", "s"), "faiss_flat": ("#7f7f7f", "s"), "faiss_ivf": ("#9467bd", "^"),
          "faiss_hnsw": ("#8c564b", "D")}


def throughput_figure(table, *, caption: str = "", extra: Sequence = ()):
    """Queries/s against candidates (log–log), one panel per device of ``table`` and of the
    ``extra`` tables (e.g. GPU rows); colour = system, line style = batch size (batch 100, or the
    closest, solid); the crossover where cart_decode overtakes dual_tower_exact marked. Returns a
    matplotlib Figure (no file I/O)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.lines import Line2D

    frames = [f for f in (table, *extra) if f is not None and len(f)]
    data = pd.concat(frames, ignore_index=True) if frames else table
    # a CSV appended to by several runs: the latest row of each (system, device, N, batch) wins
    data = data.drop_duplicates(subset=["system", "device", "n_candidates", "batch_size"], keep="last")
    devices = list(dict.fromkeys(data["device"])) or ["(no rows)"]
    fig, axes = plt.subplots(1, len(devices), figsize=(6.2 * len(devices), 4.8), squeeze=False)
    for ax, dev in zip(axes[0], devices):
        sub = data[(data["device"] == dev) & data["qps"].notna()]
        batches = sorted(set(sub["batch_size"]))
        main = min(batches, key=lambda b: (abs(b - RATIO_BATCH), b)) if batches else None
        styles = {b: "-" if b == main else (":" if b < (main or 0) else "--") for b in batches}
        for system in SYSTEMS:
            colour, marker = _STYLE[system]
            for b in batches:
                pts = sub[(sub["system"] == system) & (sub["batch_size"] == b)].sort_values("n_candidates")
                if len(pts):
                    ax.plot(pts["n_candidates"], pts["qps"], styles[b], color=colour, marker=marker, ms=4,
                            lw=2.0 if b == main else 1.0, alpha=1.0 if b == main else 0.55)
        if main is not None:
            cross = crossover(sub, batch_size=main)
            if cross is not None:
                ax.plot([cross[0]], [cross[1]], "*", color="black", ms=14, zorder=5)
                ax.annotate(f"CART overtakes exact\nN ≈ {cross[0]:,.0f}", cross, textcoords="offset points",
                            xytext=(8, -26), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("candidates N")
        ax.set_ylabel("queries / s")
        ax.set_title(str(dev), fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        handles = [Line2D([], [], color=_STYLE[s][0], marker=_STYLE[s][1], label=s) for s in SYSTEMS
                   if s in set(sub["system"])]
        handles += [Line2D([], [], color="black", ls=styles[b], lw=2.0 if b == main else 1.0, label=f"batch {b}")
                    for b in batches]
        ax.legend(handles=handles, fontsize=7, loc="best", ncol=2)
    fig.suptitle("Figure 4 analogue: throughput as the gallery grows (CART decoding vs dual-tower / FAISS)",
                 fontsize=11)
    if caption:
        import textwrap

        fig.text(0.01, -0.01, "\n".join(textwrap.wrap(caption, 115 * len(devices))), fontsize=7, va="top",
                 ha="left")
    fig.tight_layout()
    return fig


# ====================================================================== the stage

class ThroughputResult(NamedTuple):
    table: object  # pandas DataFrame, COLUMNS (the rows of throughput.csv)
    figure: object  # matplotlib Figure
    metrics: dict  # metrics.json
    galleries: object  # DataFrame: per gallery, level sizes, decoder weights, build times, FAISS settings
    skipped: object  # DataFrame: system, n_candidates, batch_size, reason
    caption: str


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


def _read_gpu_rows(path: Path):
    import pandas as pd

    if not path.exists():
        return None
    frame = pd.read_csv(path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(COLUMNS)}")
    return frame[list(COLUMNS)]


def run(params, root: str | os.PathLike = ".", *, progress: bool = True, track: bool = True) -> ThroughputResult:
    """The `throughput` stage: every system at every gallery size and batch size of
    ``params.throughput``; writes ``results/throughput/{throughput.csv, throughput.png, throughput.pdf,
    metrics.json, galleries.csv, skipped.csv}`` and (``track``) logs an MLflow run ``throughput/<task>``.
    Rows of ``results/throughput/throughput_gpu.csv``, when present, become the figure's GPU panel."""
    import pandas as pd
    from tqdm.auto import tqdm

    from cartlib import io, tracking
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
                dec = Decoder(model, FastDecoder(model), f"trained ({bundle_path.relative_to(paths.root)})")
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
    metrics = summarise(table, flops_per_query=flops, matmul_flops=matmul)
    metrics["identifier_refit_matches_stage"] = None if math.isnan(refit_matches) else refit_matches
    metrics["trained_decoder_galleries"] = int(galleries["decoder_weights"].str.startswith("trained").sum())
    metrics["allocator_retains_freed_memory"] = allocator_retains
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)

    gpu = _read_gpu_rows(out_dir / "throughput_gpu.csv")
    caption = _caption(label=label, device=device, memory=memory, galleries=galleries, metrics=metrics, cfg=cfg,
                       gpu=gpu)
    figure = throughput_figure(table, caption=caption, extra=[gpu] if gpu is not None else [])

    with io.atomic_path(out_dir / "throughput.csv") as tmp:
        table.to_csv(tmp, index=False)
    with io.atomic_path(out_dir / "galleries.csv") as tmp:
        galleries.to_csv(tmp, index=False)
    with io.atomic_path(out_dir / "skipped.csv") as tmp:
        skipped_df.to_csv(tmp, index=False)
    io.write_json(out_dir / "metrics.json", metrics)
    written = io.save_figure(figure, out_dir / "throughput")
    if track:
        tracking.log_run(root=paths.root, stage="throughput", task=task,
                         params=tracking.flatten("", {"base": params.base, "throughput": cfg}),
                         metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         artifacts=[out_dir / "metrics.json", out_dir / "throughput.csv", *written])
    return ThroughputResult(table, figure, metrics, galleries, skipped_df, caption)


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


def _caption(*, label: str, device: torch.device, memory: PeakMemory, galleries, metrics: dict, cfg, gpu) -> str:
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
        f"{'; freed blocks up to 256 MiB kept in the process (mallopt)' if metrics.get('allocator_retains_freed_memory') else ''}.",
        f"Decoder {metrics.get('decoder_flops_per_query', float('nan')) / 1e6:.0f} MFLOP/query; matmul rate "
        f"{metrics.get('matmul_gflops', float('nan')):.0f} GFLOP/s.",
    ]
    if gpu is not None:
        parts.append("GPU panel: rows of results/throughput/throughput_gpu.csv (scripts/bench_throughput_gpu.py).")
    return " ".join(parts)
