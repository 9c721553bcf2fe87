"""Galleries of the throughput benchmark: N candidates sampled from a task's real item features,
identified by the task's CART identifier model (CART, Fang et al., ACL 2025, Figure 4 analogue).

A gallery of N candidates is sampled from a distribution fitted to the task's real item features:
per K-Means cluster of the real features (the coarse clusters of the CART identifier model), a
Gaussian with the cluster's mean, its top principal directions (up to :data:`MIXTURE_RANK`, with
their variances) and a per-dimension residual std, then L2-normalised. Why this is fair:

- the identifiers come from the *real* CART identifier model of the task (its K-Means centroids
  and RQ-VAE, refit from the stage's config and seed, which reproduces the stage's table; see
  :func:`fit_identifier_model`), so the coarse-token distribution, the prefix fan-out, the
  collisions and the size of the unique-token level grow with N as they would on real data;
- the within-cluster covariance keeps the low intrinsic dimension of real features. A purely
  diagonal Gaussian per cluster spreads every cluster over all 384 dimensions: on the image task
  it drops HNSW's recall@10 from 0.99 (real features) to 0.5 at 60K items and makes IVF look worse
  than it is, an unfair handicap for the approximate baselines. With rank 32 the nearest-neighbour
  similarities, the IVF recall-vs-nprobe curve and HNSW recall match the real features closely.
"""
from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np
import torch

from cartlib.ids.prefix import PrefixIndex

__all__ = ["MIXTURE_RANK", "FeatureMixture", "fit_feature_mixture", "sample_features", "fit_identifier_model",
           "identify", "Gallery", "build_gallery", "sample_features_torch", "identify_torch", "build_gallery_torch"]

MIXTURE_RANK = 32  # principal directions kept per cluster when sampling galleries (module docstring)


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
                                   batch_size=cfg.batch_size, last_level=cfg.last_level, seed=seed,
                                   device=device, n_threads=n_threads, progress=progress)
    return model.fit(features)


def identify(model, features: np.ndarray, *, chunk: int = 262_144) -> tuple[np.ndarray, tuple[int, ...]]:
    """CART identifiers ``(k, v_1..v_M, u)`` of a new gallery under a fitted identifier model.

    The K-Means centroids and the RQ-VAE are the fitted ones; the last RQ level follows
    ``model.last_level`` (``identifiers.last_level``: the nearest code, or the balanced matching)
    and the unique token ``u`` counts the items sharing ``(k, v_1..v_M)`` *within this gallery*
    (0, 1, 2, … in row order), as ``fit`` would on it; the u level's size is then the largest
    number of candidates sharing a prefix, which grows with N. Returns ``codes (N, L)`` int64
    (rows unique) and the level sizes.
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
    if LastLevel(model.last_level) is LastLevel.BALANCED:
        v[:, -1] = balanced_last_codes(group_ids(np.column_stack([k, v[:, :-1]])), cost)
    prefix = np.column_stack([k, v])
    codes = np.column_stack([prefix, unique_token(prefix)]).astype(np.int64)
    base = (model.n_clusters,) + (model.codebook_size,) * model.n_levels
    sizes = tuple(max(a, int(b) + 1) for a, b in zip(base, prefix.max(0))) + (int(codes[:, -1].max()) + 1,)
    return codes, sizes


class Gallery(NamedTuple):
    """One gallery of the benchmark: sampled features, their CART identifiers and prefix index."""

    n_candidates: int
    features: np.ndarray  # (N, D) float32 unit rows (build_gallery_torch: a tensor on its device)
    codes: np.ndarray  # (N, L) int64 (build_gallery_torch: a tensor on its device)
    level_sizes: tuple[int, ...]
    index: PrefixIndex  # on the CPU (build_gallery_torch: on its device)
    build_seconds: float


def build_gallery(mixture: FeatureMixture, identifier_model, n: int, *, seed: int) -> Gallery:
    """Sample ``n`` candidates from ``mixture``, identify them, index the identifiers."""
    t0 = time.perf_counter()
    feats = sample_features(mixture, n, seed=seed)
    codes, sizes = identify(identifier_model, feats)
    index = PrefixIndex.build(torch.from_numpy(codes), sizes)
    return Gallery(n, feats, codes, sizes, index, time.perf_counter() - t0)


# ---------------------------------------------------------------------------- on a device (GPU galleries)
# The same galleries built with torch on any device: a 10M-candidate gallery takes seconds on a GPU
# (the NumPy path needs minutes and 15 GB of host memory). The sampler draws from the same mixture
# with torch's generator (other draws than NumPy's); identification is the same computation as
# :func:`identify` (tests hold the two to the same codes on the same features).

def sample_features_torch(mixture: FeatureMixture, n: int, *, seed: int, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n, D)`` unit rows drawn from ``mixture`` on ``device`` (as :func:`sample_features`, with
    torch's generator), returned in ``dtype`` (sampled in float32)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    weights = torch.as_tensor(mixture.weights, dtype=torch.float64, device=device)
    cluster = torch.multinomial(weights, n, replacement=True, generator=g)  # (n,)
    means, bases, scales, resid = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in
                                   (mixture.means, mixture.bases, mixture.scales, mixture.residual_std))
    out = torch.empty(n, means.shape[1], dtype=dtype, device=device)
    order = torch.argsort(cluster)
    counts = torch.bincount(cluster, minlength=len(weights)).tolist()
    lo = 0
    for k, c in enumerate(counts):  # one cluster at a time: no (n, r, D) intermediate
        if c == 0:
            continue
        rows = order[lo:lo + c]
        lo += c
        z = torch.randn(c, scales.shape[1], generator=g, device=device) * scales[k]
        x = torch.addmm(means[k][None], z, bases[k])
        x += torch.randn(c, means.shape[1], generator=g, device=device) * resid[k]
        out[rows] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return out


def identify_torch(model, features: torch.Tensor, *, chunk: int = 1 << 20) -> tuple[torch.Tensor, tuple[int, ...]]:
    """:func:`identify` on ``features (N, D)``'s device: ``codes (N, L)`` int64 there, level sizes.
    Nearest K-Means centre in float64 and the RQ-VAE's nearest codes, as the NumPy path; the unique
    token by one stable sort. ``identifiers.last_level: balanced`` needs the NumPy matching: use
    :func:`identify` for it."""
    prefix_of = _prefixer(model, features.device)
    prefix = torch.cat([prefix_of(features[lo:lo + chunk]) for lo in range(0, features.shape[0], chunk)])
    return _with_unique_token(model, prefix)


def _prefixer(model, device: torch.device):
    """A function ``x (n, D) -> (n, 1 + M)`` int64 prefixes ``(k, v_1..v_M)`` on ``device``."""
    import copy

    from cartlib.ids.rqvae import LastLevel

    if LastLevel(model.last_level) is LastLevel.BALANCED:
        raise ValueError("identify_torch: last_level 'balanced' is matched on the CPU; use identify()")
    centers = torch.as_tensor(model.cluster_centers_, dtype=torch.float64, device=device)
    c_sq = (centers ** 2).sum(1)
    rq = model.rqvae_
    net = copy.deepcopy(rq.model_).to(device).eval()
    mean = torch.as_tensor(rq.mean_, dtype=torch.float32, device=device)
    scale = np.float32(rq.scale_)

    def prefix_of(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = x.float()
            k = (c_sq[None] - 2.0 * x.double() @ centers.T).argmin(1)  # as kmeans.nearest_center
            z = net.encode((x - centers[k].float() - mean) / scale)
            return torch.cat((k[:, None], net.quantizer(z).codes), 1)

    return prefix_of


def _with_unique_token(model, prefix: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    u = _unique_token_torch(prefix)
    base = (model.n_clusters,) + (model.codebook_size,) * model.n_levels
    sizes = tuple(max(a, int(b) + 1) for a, b in zip(base, prefix.max(0).values.tolist())) + (int(u.max()) + 1,)
    return torch.cat((prefix, u[:, None]), 1), sizes


def _unique_token_torch(prefix: torch.Tensor) -> torch.Tensor:
    """(N, P) prefixes -> (N,) collision counter u: 0, 1, 2, … in row order among rows sharing a
    prefix (:func:`cartlib.ids.schemes.unique_token` without earlier items)."""
    n = prefix.shape[0]
    radix = (prefix.max(0).values + 1).tolist()
    key = torch.zeros(n, dtype=torch.long, device=prefix.device)
    for col, r in enumerate(radix):  # mixed radix: fits int64 for identifier prefixes
        key = key * int(r) + prefix[:, col]
    order = torch.sort(key, stable=True).indices  # stable: row order within a prefix
    sk = key[order]
    first = torch.ones(n, dtype=torch.bool, device=prefix.device)
    first[1:] = sk[1:] != sk[:-1]
    pos = torch.arange(n, device=prefix.device)
    start = torch.cummax(torch.where(first, pos, 0), 0).values
    u = torch.empty(n, dtype=torch.long, device=prefix.device)
    u[order] = pos - start
    return u


def build_gallery_torch(mixture: FeatureMixture, identifier_model, n: int, *, seed: int,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        chunk: int = 1 << 20) -> Gallery:
    """:func:`build_gallery` on ``device``: ``features`` is a ``(N, D)`` tensor in ``dtype`` there,
    ``codes`` an int64 tensor there, the prefix index built there. Sampled and identified in chunks
    (the float32 features of one chunk at a time)."""
    t0 = time.perf_counter()
    device = torch.device(device)
    prefix_of = _prefixer(identifier_model, device)
    feats = torch.empty(n, identifier_model.cluster_centers_.shape[1], dtype=dtype, device=device)
    parts = []
    for i, lo in enumerate(range(0, n, chunk)):
        x = sample_features_torch(mixture, min(chunk, n - lo), seed=seed * 1000 + i, device=device)
        feats[lo:lo + len(x)] = x.to(dtype)
        parts.append(prefix_of(x))
        del x
    codes, sizes = _with_unique_token(identifier_model, torch.cat(parts))
    index = PrefixIndex.build(codes, sizes)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Gallery(n, feats, codes, sizes, index, time.perf_counter() - t0)
