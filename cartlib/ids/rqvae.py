"""Residual-quantised VAE for the fine tokens `v_1..v_M` of the identifier.

Collapse guards (RQ-VAE projects' most common failure is every item landing on a few codes):
- inputs are standardised (mean removed, divided by one global RMS scale), so the reconstruction
  loss is relative to the input variance whatever the feature scale (K-Means residuals of unit-norm
  features are much smaller than the features);
- the latent is batch-standardised (BatchNorm without affine): each latent dimension keeps unit
  variance across items, so the encoder cannot win the commitment term by shrinking the latent
  into a point, and β means the same at every scale. (A per-item norm such as LayerNorm would
  hide the fine differences inside a large residual; a commitment divided by the batch variance
  feeds back on itself and collapsed in our tests.)
- the first `warmup_fraction` of the epochs train the plain autoencoder (no quantiser); the
  codebooks are then initialised by k-means on the latents of a first batch, so they start on an
  informative latent rather than a random projection;
- codebooks follow EMA (k-means-like) updates with straight-through gradients to the encoder, and
  codes whose EMA usage falls below `dead_code_threshold` × the uniform share are re-seeded from
  batch latents.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from enum import StrEnum
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cartlib.ids.kmeans import check_features, check_positive, fit_kmeans, thread_limit

_ENCODE_BATCH = 65_536  # rows per no-grad encoding pass; bounds memory at N = 1M


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, d) straight-through sum of the chosen codewords
    codes: torch.Tensor  # (B, M) int64
    commitment_loss: torch.Tensor  # scalar, relative to the latent variance


class RQVAEOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, D) in standardised input space
    codes: torch.Tensor  # (B, M) int64
    loss: torch.Tensor  # reconstruction + beta * commitment
    reconstruction_loss: torch.Tensor  # MSE relative to the input variance (≈ rel. error²)
    commitment_loss: torch.Tensor


class Encoding(NamedTuple):
    codes: np.ndarray  # (N, M) int64, nearest codeword per level
    last_cost: np.ndarray  # (N, K_M) float32 squared distance of the last level's input to each
    #                        last-level codeword (what a collision-aware assignment trades off)


class EpochStats(NamedTuple):
    loss: float
    reconstruction_loss: float
    commitment_loss: float
    perplexity: tuple[float, ...]  # per level, over the epoch's assignments
    n_reseeded: int  # dead codes re-seeded during the epoch


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; other names pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def _reset_linear(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear init, but drawn from `generator` (no global RNG state)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.bias, -bound, bound, generator=generator)


def _sq_dist(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(B, d), (K, d) -> (B, K) squared Euclidean distances."""
    return x.pow(2).sum(1, keepdim=True) - 2.0 * x @ codebook.T + codebook.pow(2).sum(1)[None]


def _nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(B, d), (K, d) -> (B,) index of the nearest codeword."""
    return _sq_dist(x, codebook).argmin(1)


def _perplexity(codes: torch.Tensor, size: int) -> float:
    p = torch.bincount(codes, minlength=size).double()
    p = p / p.sum()
    nz = p[p > 0]
    return float(torch.exp(-(nz * nz.log()).sum()))


class ResidualQuantizer(nn.Module):
    """M codebooks applied one after another, each to what the previous levels left.

    CART, Fang et al., ACL 2025, identifier (fine tokens v_1..v_M). Codebooks are buffers
    updated by EMA (not by gradients), re-seeded from batch latents when a code goes unused.
    """

    def __init__(self, *, codebook_sizes: Sequence[int], dim: int, decay: float = 0.95,
                 dead_code_threshold: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.codebook_sizes = tuple(int(k) for k in codebook_sizes)
        self.dim = dim
        self.decay = decay
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        self.n_reseeded = 0  # dead codes re-seeded since the trainer last reset it
        for level, k in enumerate(self.codebook_sizes):
            self.register_buffer(f"codebook_{level}", torch.zeros(k, dim))
            self.register_buffer(f"ema_count_{level}", torch.zeros(k))  # (K,) EMA usage per batch
            self.register_buffer(f"ema_sum_{level}", torch.zeros(k, dim))  # (K, d)

    def codebook(self, level: int) -> torch.Tensor:
        return getattr(self, f"codebook_{level}")

    @torch.no_grad()
    def init_from(self, latents: torch.Tensor, *, batch_size: int, seed: int) -> None:
        """k-means init of each level on (n, d) latents, level by level on the residuals."""
        residual = latents.detach().cpu().numpy().astype(np.float32)
        n = residual.shape[0]
        for level, k in enumerate(self.codebook_sizes):
            n_distinct = len(np.unique(residual.round(6), axis=0))
            fit = fit_kmeans(residual, n_clusters=min(k, n_distinct), seed=seed + level)
            centers = fit.centers
            if centers.shape[0] < k:  # tiny samples: fill the rest with jittered data points
                rng = np.random.default_rng(seed + level)
                extra = residual[rng.integers(0, n, k - centers.shape[0])]
                jitter = rng.standard_normal(extra.shape).astype(np.float32)
                extra = extra + 1e-3 * residual.std() * jitter
                centers = np.concatenate([centers, extra.astype(np.float32)])
            counts = np.bincount(fit.labels, minlength=k).astype(np.float32) * (batch_size / n)
            codebook = torch.from_numpy(centers).to(latents.device)
            count = torch.from_numpy(counts).to(latents.device)
            self.codebook(level).copy_(codebook)
            getattr(self, f"ema_count_{level}").copy_(count)
            getattr(self, f"ema_sum_{level}").copy_(codebook * count[:, None])
            residual = residual - centers[fit.labels]

    def forward(self, z: torch.Tensor, *,
                generator: torch.Generator | None = None) -> QuantizerOutput:
        """(B, d) latents -> quantised latents, codes, commitment loss; EMA update when training."""
        residual = z
        quantized = torch.zeros_like(z)
        codes = []
        commitment = z.new_zeros(())
        for level in range(len(self.codebook_sizes)):
            idx = _nearest(residual.detach(), self.codebook(level))
            if self.training:
                self._ema_update(level, residual.detach(), idx, generator)
            chosen = self.codebook(level)[idx]  # (B, d), no gradient: EMA owns the codebook
            commitment = commitment + F.mse_loss(residual, chosen)
            residual = residual - chosen
            quantized = quantized + chosen
            codes.append(idx)
        # Straight-through: forward uses the codewords, backward passes the gradient to z.
        quantized = z + (quantized - z).detach()
        commitment = commitment / len(self.codebook_sizes)
        return QuantizerOutput(quantized, torch.stack(codes, 1), commitment)

    @torch.no_grad()
    def _ema_update(self, level: int, x: torch.Tensor, idx: torch.Tensor,
                    generator: torch.Generator | None) -> None:
        k = self.codebook_sizes[level]
        count = getattr(self, f"ema_count_{level}")
        total = getattr(self, f"ema_sum_{level}")
        batch_count = torch.bincount(idx, minlength=k).to(x.dtype)
        batch_sum = torch.zeros_like(total).index_add_(0, idx, x)
        count.mul_(self.decay).add_(batch_count, alpha=1 - self.decay)
        total.mul_(self.decay).add_(batch_sum, alpha=1 - self.decay)
        n = count.sum()
        smoothed = (count + self.eps) / (n + k * self.eps) * n  # Laplace: no division by 0
        self.codebook(level).copy_(total / smoothed[:, None])
        self.n_reseeded += self._reseed_dead(level, x, generator)

    @torch.no_grad()
    def _reseed_dead(self, level: int, x: torch.Tensor, generator: torch.Generator | None) -> int:
        if self.dead_code_threshold <= 0:
            return 0
        k = self.codebook_sizes[level]
        share = x.shape[0] / k  # uniform usage per batch
        count = getattr(self, f"ema_count_{level}")
        dead = torch.nonzero(count < self.dead_code_threshold * share).flatten()
        if dead.numel() == 0:
            return 0
        pick = torch.randint(0, x.shape[0], (dead.numel(),), generator=generator, device="cpu")
        seeds = x[pick.to(x.device)]
        self.codebook(level)[dead] = seeds
        count[dead] = share  # a fresh code gets a uniform share of grace before it can die again
        getattr(self, f"ema_sum_{level}")[dead] = seeds * share
        return int(dead.numel())


class RQVAE(nn.Module):
    """MLP encoder -> residual quantiser -> MLP decoder.

    CART, Fang et al., ACL 2025, identifier: the RQ-VAE that turns the K-Means residual into
    the fine tokens; loss = reconstruction + β·commitment (the standard RQ-VAE recipe, Lee et al.
    2022), codebooks by EMA with straight-through gradients.
    """

    def __init__(self, *, input_dim: int, hidden_dim: int, latent_dim: int,
                 codebook_sizes: Sequence[int], ema_decay: float = 0.95,
                 dead_code_threshold: float = 0.1, normalize_latent: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _mlp([input_dim, hidden_dim, hidden_dim, latent_dim])
        self.decoder = _mlp([latent_dim, hidden_dim, hidden_dim, input_dim])
        # Batch-standardised latent: every dimension keeps unit variance across items, so the
        # encoder cannot shrink the latent into a point to win the commitment term.
        self.latent_norm = (nn.BatchNorm1d(latent_dim, affine=False) if normalize_latent
                            else nn.Identity())
        self.quantizer = ResidualQuantizer(codebook_sizes=codebook_sizes, dim=latent_dim,
                                           decay=ema_decay, dead_code_threshold=dead_code_threshold)
        if generator is not None:
            _reset_linear(self, generator)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) standardised features -> (B, d) latent."""
        return self.latent_norm(self.encoder(x))

    def forward(self, x: torch.Tensor, *, beta: float, quantize: bool = True,
                generator: torch.Generator | None = None) -> RQVAEOutput:
        """(B, D) standardised features -> RQVAEOutput; `quantize=False` is the AE warm-up."""
        z = self.encode(x)
        if not quantize:
            x_hat = self.decoder(z)
            recon = F.mse_loss(x_hat, x)
            empty = torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)
            return RQVAEOutput(x_hat, empty, recon, recon, recon.new_zeros(()))
        q = self.quantizer(z, generator=generator)
        x_hat = self.decoder(q.quantized)
        recon = F.mse_loss(x_hat, x)  # x has unit per-element variance: this is rel. error²
        loss = recon + beta * q.commitment_loss
        return RQVAEOutput(x_hat, q.codes, loss, recon, q.commitment_loss)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, *, n_levels: int | None = None) -> torch.Tensor:
        """(B, M) codes -> (B, D) standardised reconstruction from the first `n_levels` levels."""
        m = codes.shape[1] if n_levels is None else n_levels
        q = sum(self.quantizer.codebook(level)[codes[:, level]] for level in range(m))
        return self.decoder(q)


class RQVAEQuantizer:
    """Fine tokens `v_1..v_M` of the identifier: an RQ-VAE on (residual) features.

    CART, Fang et al., ACL 2025, identifier. scikit-learn surface: `fit(features)` sets
    `codes_` (N, M) int64, `level_sizes_`, `model_`, `history_` (one EpochStats per epoch),
    `reconstruction_rel_error_` (‖X − X̂‖_F / ‖X‖_F over the items), `mean_`, `scale_`.
    Training uses at most `max_train_items` items (a seeded sample); encoding runs in batches, so
    N = 1M works. Deterministic for a seed on the CPU. `device`: "cpu", "cuda" or "auto".
    `n_threads`: torch/BLAS threads during fit and encode (restored afterwards); 1 by default
    because these small matmuls gain nothing from more threads and lose 10-30x to spinning
    OpenMP threads on a shared CPU; None leaves the process setting alone.
    """

    def __init__(
        self,
        *,
        codebook_sizes: Sequence[int] = (64, 64),
        latent_dim: int = 32,
        hidden_dim: int = 128,
        epochs: int = 20,
        lr: float = 2e-3,
        beta: float = 0.25,
        batch_size: int = 256,
        seed: int = 0,
        ema_decay: float = 0.95,
        dead_code_threshold: float = 0.1,
        max_train_items: int = 100_000,
        warmup_fraction: float = 0.3,
        normalize_latent: bool = True,
        device: str = "cpu",
        n_threads: int | None = 1,
        progress: bool = False,
    ) -> None:
        self.codebook_sizes = tuple(check_positive(k, name="codebook_size", minimum=2)
                                    for k in codebook_sizes)
        if not self.codebook_sizes:
            raise ValueError("n_levels must be >= 1; got 0 codebooks")
        self.latent_dim = check_positive(latent_dim, name="latent_dim")
        self.hidden_dim = check_positive(hidden_dim, name="hidden_dim")
        self.epochs = check_positive(epochs, name="epochs")
        self.batch_size = check_positive(batch_size, name="batch_size")
        self.max_train_items = check_positive(max_train_items, name="max_train_items")
        if not lr > 0:
            raise ValueError(f"lr must be > 0; got {lr}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0; got {beta}")
        if not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1); got {ema_decay}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1); got {warmup_fraction}")
        self.warmup_fraction = warmup_fraction
        self.normalize_latent = normalize_latent
        self.lr = lr
        self.beta = beta
        self.seed = seed
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.device = device
        self.n_threads = n_threads
        self.progress = progress

    def fit(self, features: object) -> "RQVAEQuantizer":
        x_np = check_features(features)
        with thread_limit(self.n_threads):
            return self._fit(x_np)

    def _fit(self, x_np: np.ndarray) -> "RQVAEQuantizer":
        t0 = time.perf_counter()
        n, d = x_np.shape
        if n < 2:
            raise ValueError(f"the RQ-VAE needs at least 2 items to train; got N={n}")
        rng = np.random.default_rng(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.device_ = resolve_device(self.device)
        dev = torch.device(self.device_)
        # Large galleries train on a seeded sample; every item is encoded afterwards.
        if n > self.max_train_items:
            train_idx = np.sort(rng.choice(n, self.max_train_items, replace=False))
        else:
            train_idx = np.arange(n)
        sample = x_np[train_idx]
        # Standardise: one global RMS scale keeps the geometry and makes the loss relative.
        self.mean_ = sample.mean(0, dtype=np.float64).astype(np.float32)
        centred = sample - self.mean_
        self.scale_ = float(np.sqrt(np.mean(np.square(centred), dtype=np.float64))) or 1.0
        train = torch.from_numpy(centred / np.float32(self.scale_)).to(dev)

        model = RQVAE(input_dim=d, hidden_dim=self.hidden_dim, latent_dim=self.latent_dim,
                      codebook_sizes=self.codebook_sizes, ema_decay=self.ema_decay,
                      dead_code_threshold=self.dead_code_threshold,
                      normalize_latent=self.normalize_latent, generator=gen).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        n_warmup = round(self.epochs * self.warmup_fraction)
        epochs = range(self.epochs)
        if self.progress:
            from tqdm.auto import tqdm
            epochs = tqdm(epochs, desc="rq-vae", leave=False)
        self.history_ = []
        for epoch in epochs:
            if epoch == n_warmup:
                self._init_codebooks(model, train, gen)
            self.history_.append(self._epoch(model, opt, train, gen, quantize=epoch >= n_warmup))
        model.eval()
        self.model_ = model
        self.n_features_in_ = d
        self.codes_ = self.transform(x_np)
        self.level_sizes_ = self.codebook_sizes
        self.reconstruction_rel_error_ = self.reconstruction_error(x_np, self.codes_)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _init_codebooks(self, model: RQVAE, train: torch.Tensor, gen: torch.Generator) -> None:
        """k-means on the latents of a first batch (big enough for K centres), level by level."""
        n_init = min(len(train), max(self.batch_size, 16 * max(self.codebook_sizes)))
        rows = torch.randperm(len(train), generator=gen)[:n_init].to(train.device)
        with torch.no_grad():
            model.quantizer.init_from(model.encode(train[rows]),
                                      batch_size=min(self.batch_size, len(train)), seed=self.seed)

    def _epoch(self, model: RQVAE, opt: torch.optim.Optimizer, train: torch.Tensor,
               gen: torch.Generator, *, quantize: bool) -> EpochStats:
        n = len(train)
        bs = min(self.batch_size, n)
        model.train()
        perm = torch.randperm(n, generator=gen).to(train.device)
        model.quantizer.n_reseeded = 0
        sums = np.zeros(3)
        all_codes = []
        # drop the ragged last batch: a tiny batch makes noisy EMA counts and false "dead" codes
        n_batches = max(1, n // bs)
        for b in range(n_batches):
            out = model(train[perm[b * bs:(b + 1) * bs]], beta=self.beta, quantize=quantize,
                        generator=gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sums += [out.loss.item(), out.reconstruction_loss.item(), out.commitment_loss.item()]
            all_codes.append(out.codes.detach())
        ppl: tuple[float, ...] = ()
        if quantize:
            codes = torch.cat(all_codes).cpu()
            ppl = tuple(_perplexity(codes[:, m], k) for m, k in enumerate(self.codebook_sizes))
        sums /= n_batches
        return EpochStats(*map(float, sums), ppl, model.quantizer.n_reseeded)

    def _standardise(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((x - self.mean_) / np.float32(self.scale_)).to(self.device_)

    def transform(self, features: object) -> np.ndarray:
        """(N, D) -> (N, M) int64 codes (nearest codeword per level), in batches."""
        return self.encode(features).codes

    def encode(self, features: object) -> Encoding:
        """(N, D) -> nearest codes plus the last level's distances to all its codewords."""
        x = check_features(features)
        self._check_fitted(x)
        n, m = x.shape[0], len(self.codebook_sizes)
        codes = np.empty((n, m), dtype=np.int64)
        cost = np.empty((n, self.codebook_sizes[-1]), dtype=np.float32)
        quantizer = self.model_.quantizer
        self.model_.eval()
        with torch.no_grad(), thread_limit(self.n_threads):
            for s in range(0, n, _ENCODE_BATCH):
                z = self.model_.encode(self._standardise(x[s:s + _ENCODE_BATCH]))
                c = quantizer(z).codes
                for level in range(m - 1):  # what the last level quantises
                    z = z - quantizer.codebook(level)[c[:, level]]
                cost[s:s + _ENCODE_BATCH] = _sq_dist(z, quantizer.codebook(m - 1)).cpu().numpy()
                codes[s:s + _ENCODE_BATCH] = c.cpu().numpy()
        return Encoding(codes, cost)

    def reconstruct(self, codes: np.ndarray, *, n_levels: int | None = None) -> np.ndarray:
        """(N, M) codes -> (N, D) float32 features decoded from the first `n_levels` levels."""
        if not hasattr(self, "model_"):
            raise RuntimeError("RQVAEQuantizer is not fitted; call fit(features) first")
        c = np.asarray(codes, dtype=np.int64)
        out = np.empty((c.shape[0], self.n_features_in_), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, c.shape[0], _ENCODE_BATCH):
                part = torch.from_numpy(c[s:s + _ENCODE_BATCH]).to(self.device_)
                x_hat = self.model_.decode_codes(part, n_levels=n_levels).cpu().numpy()
                out[s:s + _ENCODE_BATCH] = x_hat * self.scale_ + self.mean_
        return out

    def reconstruction_error(self, features: object, codes: np.ndarray, *,
                             n_levels: int | None = None) -> float:
        """‖X − X̂‖_F / ‖X‖_F with X̂ decoded from `codes` (first `n_levels` levels)."""
        x = check_features(features)
        num = den = 0.0
        for s in range(0, x.shape[0], _ENCODE_BATCH):
            part = x[s:s + _ENCODE_BATCH].astype(np.float64)
            x_hat = self.reconstruct(codes[s:s + _ENCODE_BATCH], n_levels=n_levels)
            num += float(((part - x_hat) ** 2).sum())
            den += float((part ** 2).sum())
        return math.sqrt(num / den) if den > 0 else 0.0

    def _check_fitted(self, x: np.ndarray) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("RQVAEQuantizer is not fitted; call fit(features) first")
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"features have D={x.shape[1]} dims; the model was fitted on "
                             f"D={self.n_features_in_}")


# ----------------------------------------------------------------- collision-aware last level

class LastLevel(StrEnum):
    """How the last RQ level picks its code (params.yaml `identifiers.last_level`)."""

    # The paper's rule and the default: plain residual quantisation, the nearest codeword at
    # every level; items sharing `(k, v_1..v_M)` are told apart by the counter `u` alone.
    NEAREST = "nearest"
    # Items that share every code before the last level are spread over distinct last-level
    # codes at minimum total distance (uniform semantic mapping in the spirit of LC-Rec,
    # Zheng et al., ICDE 2024). Near-duplicates then differ by a nearby code instead of by an
    # arbitrary counter, and `u` stays small. An ablation (params.yaml row `balanced_last_level`).
    BALANCED = "balanced"


def group_ids(prefix: np.ndarray) -> np.ndarray:
    """(N, P) rows -> (N,) int64 id of each distinct row (P = 0: one group)."""
    if prefix.shape[1] == 0:
        return np.zeros(prefix.shape[0], dtype=np.int64)
    return np.unique(prefix, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def balanced_last_codes(groups: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """(N,) group of each item, (N, K) cost of each last-level code -> (N,) int64 codes.

    Within a group of g items each code takes at most ceil(g / K) items (so items take distinct
    codes while g <= K). The assignment is the item-proposing stable matching (Gale-Shapley with
    capacities): no item prefers a code that would rather have it than one of its holders, codes
    preferring cheaper items. Vectorised over all groups, O(N K) memory; groups whose nearest
    codes are already distinct keep them.
    """
    n, k = cost.shape
    codes = cost.argmin(1).astype(np.int64)
    key = groups * k + codes
    _, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    clashing = np.unique(groups[counts[inv.reshape(-1)] > 1])
    items = np.flatnonzero(np.isin(groups, clashing))  # every item of a clashing group
    if items.size == 0:
        return codes
    c = cost[items]  # (m, K)
    _, group, size = np.unique(groups[items], return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    capacity = -(-size // k)  # per group
    preference = np.argsort(c, axis=1, kind="stable")  # (m, K) codes, cheapest first
    tried = np.zeros(items.size, dtype=np.int64)  # how many codes each item has proposed to
    held = np.full(items.size, -1, dtype=np.int64)
    free = np.arange(items.size)
    while free.size:
        proposal = preference[free, tried[free]]
        tried[free] += 1
        bins = group[free] * k + proposal
        holders = np.flatnonzero(held >= 0)
        holders = holders[np.isin(group[holders] * k + held[holders], bins)]
        cand = np.concatenate([holders, free])
        cand_code = np.concatenate([held[holders], proposal])
        cand_bin = group[cand] * k + cand_code
        order = np.lexsort((cand, c[cand, cand_code], cand_bin))  # by bin, then cost, then item
        sorted_bin = cand_bin[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = sorted_bin[1:] != sorted_bin[:-1]
        start = np.maximum.accumulate(np.where(first, np.arange(order.size), 0))
        rank = np.arange(order.size) - start  # position within the bin
        keep = rank < capacity[group[cand[order]]]
        held[cand[order[keep]]] = cand_code[order[keep]]
        held[cand[order[~keep]]] = -1
        free = np.sort(cand[order[~keep]])
    codes[items] = held
    return codes


def free_last_codes(table_prefix: np.ndarray, table_last: np.ndarray, new_prefix: np.ndarray,
                    cost: np.ndarray) -> np.ndarray:
    """Last-level codes for new items: the nearest code not yet taken within the item's prefix
    (by the table or by an earlier new item); the nearest code when all are taken.

    table_prefix (N, P) and table_last (N,) describe the fitted table; new_prefix (n, P) and
    cost (n, K) the new items. Returns (n,) int64.
    """
    k = cost.shape[1]
    groups = group_ids(np.concatenate([table_prefix, new_prefix]))
    taken = set((groups[: len(table_last)] * k + table_last).tolist())
    new_groups = groups[len(table_last):]
    ranked = np.argsort(cost, axis=1, kind="stable")  # (n, K) codes, nearest first
    out = ranked[:, 0].astype(np.int64)
    for i, g in enumerate(new_groups.tolist()):
        for c in ranked[i].tolist():
            if g * k + c not in taken:
                out[i] = c
                break
        taken.add(g * k + int(out[i]))
    return out
