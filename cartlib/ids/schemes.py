"""Identifier schemes under one scikit-learn style surface, chosen by `Scheme`.

Every estimator's `fit(features)` sets `codes_` (N, L) int64 whose rows are all distinct: each
scheme ends its codes with the unique token `u` (items sharing the prefix get u = 0, 1, 2, … in
item order), except `atomic`, whose single token is already unique. `level_sizes_` gives the
codebook size per level (the last = max(u) + 1), `reconstruction_rel_error_` how much of the
features the prefix keeps (‖X − X̂‖_F / ‖X‖_F), `fit_seconds_` the wall time of `fit`.

`last_level` (CART and RQ-VAE only; keyword-only, params.yaml `identifiers.last_level`):
"nearest" (the default, as in params.yaml and the paper) takes the nearest codeword at every RQ
level, so items whose prefix `(k, v_1..v_M)` collides are told apart by `u` alone; "balanced"
spreads the items of a shared `(k, v_1..v_{M-1})` over distinct last-level codes (an ablation).
Every caller in the suite passes it from the config.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from enum import StrEnum
from typing import NamedTuple

import numpy as np

from cartlib.ids.health import identifier_health
from cartlib.ids.kmeans import (
    MINIBATCH_THRESHOLD, check_features, check_n_clusters, check_positive, fit_kmeans,
    nearest_center, thread_limit,
)
from cartlib.ids.rqvae import (
    Encoding, LastLevel, RQVAEQuantizer, balanced_last_codes, free_last_codes, group_ids,
)

_BATCH = 65_536  # rows per pass when computing errors at N = 1M


class Scheme(StrEnum):
    """Identifier scheme; the values are the names used in params.yaml."""

    CART = "cart"  # (k, v_1..v_M, u): K-Means + residual RQ-VAE + unique token
    ATOMIC = "atomic"  # one unique random token per item (GRACE)
    HIERARCHICAL_KMEANS = "hierarchical_kmeans"  # DSI-style; the paper's "w/o RQ-VAE"
    RQVAE_ONLY = "rqvae_only"  # RQ-VAE on raw features (TIGER-style); the paper's "w/o K-Means"
    KMEANS_UNIQUE = "kmeans_unique"  # (k, u)
    RANDOM = "random"  # random codes of CART's shape + unique token: a control


# --------------------------------------------------------------------------- unique token

def unique_token(prefix: np.ndarray, *, seen_prefixes: np.ndarray | None = None,
                 seen_counts: np.ndarray | None = None) -> np.ndarray:
    """(N, P) prefixes -> (N,) int64 collision counter u.

    Items sharing a prefix get 0, 1, 2, … in item order, after the `seen_counts` items that
    already hold that prefix (`seen_prefixes` (G, P), `seen_counts` (G,)).
    """
    prefix = np.asarray(prefix, dtype=np.int64)
    n = prefix.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if seen_prefixes is None:
        seen_prefixes = np.zeros((0, prefix.shape[1]), dtype=np.int64)
        seen_counts = np.zeros(0, dtype=np.int64)
    g = len(seen_prefixes)
    keys, inv = np.unique(np.concatenate([seen_prefixes, prefix]), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    offset = np.zeros(len(keys), dtype=np.int64)
    offset[inv[:g]] = seen_counts
    group = inv[g:]
    order = np.argsort(group, kind="stable")  # stable: item order within a prefix
    sorted_group = group[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_group[1:] != sorted_group[:-1]
    start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - start
    return offset[group] + rank


class PrefixTable(NamedTuple):
    prefixes: np.ndarray  # (G, P) distinct prefixes
    counts: np.ndarray  # (G,) items holding each = max(u) + 1


class PrefixFit(NamedTuple):
    codes: np.ndarray  # (N, P) int64 codes before the unique token
    reconstruction_rel_error: float  # ‖X − X̂‖_F / ‖X‖_F


def _prefix_table(prefix: np.ndarray, u: np.ndarray) -> PrefixTable:
    keys, inv = np.unique(prefix, axis=0, return_inverse=True)
    counts = np.zeros(len(keys), dtype=np.int64)
    np.maximum.at(counts, inv.reshape(-1), u + 1)
    return PrefixTable(keys, counts)


def _rel_error(x: np.ndarray, reconstruct: Callable[[slice], np.ndarray]) -> float:
    """‖X − X̂‖_F / ‖X‖_F, with X̂ built batch by batch by `reconstruct(rows)`."""
    num = den = 0.0
    for s in range(0, x.shape[0], _BATCH):
        rows = slice(s, s + _BATCH)
        part = x[rows].astype(np.float64)
        num += float(((part - reconstruct(rows)) ** 2).sum())
        den += float((part ** 2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


# --------------------------------------------------------------------------- base class

class IdentifierModel:
    """Shared fit/transform/extend logic; subclasses supply the prefix before `u`.

    CART, Fang et al., ACL 2025, identifier: `u` counts collisions of the semantic prefix
    so that every full identifier is unique (the paper's "prefix database").
    """

    scheme: Scheme
    has_unique_token: bool = True

    # -- subclass hooks
    def _check_data(self, x: np.ndarray) -> None:
        """Raise ValueError for data this scheme cannot fit (before any work)."""

    def _fit_prefix(self, x: np.ndarray) -> PrefixFit:
        """(N, D) -> prefix codes and reconstruction error; learns the scheme's state."""
        raise NotImplementedError

    def _encode_prefix(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, P) int64 prefix codes of new items."""
        raise NotImplementedError

    def _prefix_sizes(self) -> tuple[int, ...]:
        raise NotImplementedError

    # -- public surface
    def fit(self, features: object) -> "IdentifierModel":
        """Learn the identifier table of `features` (N, D); sets `codes_`, `level_sizes_`, …"""
        x = check_features(features)
        self._check_data(x)
        t0 = time.perf_counter()
        with thread_limit(getattr(self, "n_threads", None)):
            prefix, err = self._fit_prefix(x)
        self.n_features_in_ = x.shape[1]
        self.reconstruction_rel_error_ = float(err)
        self._set_table(np.column_stack([prefix, unique_token(prefix)]))
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def fit_transform(self, features: object) -> np.ndarray:
        return self.fit(features).codes_

    def transform(self, features: object) -> np.ndarray:
        """(N_new, D) -> (N_new, L) codes of items added later; the fitted table is unchanged.

        New items' `u` count after the fitted items with the same prefix (and after each other),
        so they never collide with `codes_`; `u` may exceed `level_sizes_[-1] - 1`. Use `extend`
        to append them to the table.
        """
        x = self._check_new(features)
        with thread_limit(getattr(self, "n_threads", None)):
            prefix = self._encode_prefix(x)
        u = unique_token(prefix, seen_prefixes=self._seen.prefixes, seen_counts=self._seen.counts)
        return np.column_stack([prefix, u]).astype(np.int64)

    def extend(self, features: object) -> np.ndarray:
        """Encode new items, append them to `codes_` and grow `level_sizes_`; returns their codes."""
        new = self.transform(features)
        self._set_table(np.concatenate([self.codes_, new]))
        return new

    def health(self) -> dict[str, float]:
        """`identifier_health` of the fitted table, reconstruction error and fit time included."""
        return identifier_health(
            self.codes_, self.level_sizes_, has_unique_token=self.has_unique_token,
            reconstruction_rel_error=self.reconstruction_rel_error_, fit_seconds=self.fit_seconds_,
        )

    # -- helpers
    def _check_new(self, features: object) -> np.ndarray:
        if not hasattr(self, "codes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(features) first")
        x = check_features(features)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"features have D={x.shape[1]} dims; the model was fitted on "
                             f"D={self.n_features_in_}")
        return x

    def _set_table(self, codes: np.ndarray) -> None:
        """Store the (N, L) table and what `transform` needs to continue its unique tokens."""
        self.codes_ = codes.astype(np.int64)
        prefix, u = self.codes_[:, :-1], self.codes_[:, -1]
        self._seen = _prefix_table(prefix, u)
        sizes = tuple(max(a, int(b) + 1) for a, b in zip(self._prefix_sizes(), prefix.max(0)))
        self.level_sizes_ = sizes + (int(u.max()) + 1,)


def _check_levels(n_levels: int, codebook_size: int) -> tuple[int, int]:
    return (check_positive(n_levels, name="n_levels"),
            check_positive(codebook_size, name="codebook_size", minimum=2))


def _last_level(mode: LastLevel | str) -> LastLevel:
    try:
        return LastLevel(mode)
    except ValueError:
        raise ValueError(f"unknown last_level {mode!r}; expected one of "
                         f"{[m.value for m in LastLevel]}") from None


def _check_clusters(n_clusters: int) -> int:
    return check_positive(n_clusters, name="n_clusters", minimum=1)


def _no_head(x: np.ndarray) -> np.ndarray:
    return np.zeros((x.shape[0], 0), dtype=np.int64)


def _fine_codes(enc: Encoding, head: np.ndarray, mode: LastLevel,
                table: np.ndarray | None = None) -> np.ndarray:
    """RQ codes (N, M) with the last level assigned per `mode`.

    head (N, h): the identifier columns before the RQ codes (k for CART, none for RQ-VAE only);
    table: the fitted (N_table, L) codes when encoding items added later.
    """
    v = enc.codes.copy()
    if mode is LastLevel.NEAREST:
        return v
    prefix = np.column_stack([head, v[:, :-1]]).astype(np.int64)
    if table is None:
        v[:, -1] = balanced_last_codes(group_ids(prefix), enc.last_cost)
    else:
        v[:, -1] = free_last_codes(table[:, :-2], table[:, -2], prefix, enc.last_cost)
    return v


# --------------------------------------------------------------------------- CART

class CartIdentifier(IdentifierModel):
    """CART identifier `(k, v_1..v_M, u)`.

    CART, Fang et al., ACL 2025, identifier: K-Means gives the coarse token `k`; an RQ-VAE
    quantises the residual `x − centroid_k` into `v_1..v_M` (nearest codeword at every level with
    `last_level="nearest"`, the paper's rule); `u` counts the items that share `(k, v_1..v_M)`
    (0, 1, 2, … in item row order).
    After fit: `cluster_centers_` (K, D), `labels_` (N,), `rqvae_` (fitted RQVAEQuantizer, with
    `history_`), `codes_`, `level_sizes_`, `reconstruction_rel_error_` (centroid + decoded
    residual vs the features), `fit_seconds_`.
    """

    scheme = Scheme.CART

    def __init__(
        self,
        *,
        n_clusters: int = 64,
        n_levels: int = 2,
        codebook_size: int = 64,
        latent_dim: int = 32,
        hidden_dim: int = 128,
        epochs: int = 20,
        lr: float = 2e-3,
        beta: float = 0.25,
        batch_size: int = 256,
        seed: int = 0,
        ema_decay: float = 0.95,
        dead_code_threshold: float = 0.1,
        warmup_fraction: float = 0.3,
        normalize_latent: bool = True,
        max_train_items: int = 100_000,
        minibatch_threshold: int = MINIBATCH_THRESHOLD,
        device: str = "cpu",
        n_threads: int | None = 1,
        last_level: LastLevel | str = LastLevel.NEAREST,
        progress: bool = False,
    ) -> None:
        self.last_level = _last_level(last_level)
        self.n_clusters = _check_clusters(n_clusters)
        self.n_levels, self.codebook_size = _check_levels(n_levels, codebook_size)
        self.seed = seed
        self.minibatch_threshold = minibatch_threshold
        self.n_threads = n_threads
        # Built now so its hyperparameters are validated before any fitting.
        self.rqvae = RQVAEQuantizer(
            codebook_sizes=(self.codebook_size,) * self.n_levels, latent_dim=latent_dim,
            hidden_dim=hidden_dim, epochs=epochs, lr=lr, beta=beta, batch_size=batch_size,
            seed=seed, ema_decay=ema_decay, dead_code_threshold=dead_code_threshold,
            warmup_fraction=warmup_fraction, normalize_latent=normalize_latent,
            max_train_items=max_train_items, device=device,
            n_threads=n_threads, progress=progress,
        )

    def _check_data(self, x: np.ndarray) -> None:
        check_n_clusters(self.n_clusters, x.shape[0])

    def _fit_prefix(self, x: np.ndarray) -> PrefixFit:
        km = fit_kmeans(x, n_clusters=self.n_clusters, seed=self.seed,
                        minibatch_threshold=self.minibatch_threshold)
        self.cluster_centers_, self.labels_ = km.centers, km.labels
        residual = np.empty_like(x)  # (N, D), filled in batches: no (N, D) temporary at 1M
        for s in range(0, x.shape[0], _BATCH):
            residual[s:s + _BATCH] = x[s:s + _BATCH] - km.centers[km.labels[s:s + _BATCH]]
        self.rqvae_ = copy.deepcopy(self.rqvae).fit(residual)
        v = _fine_codes(self.rqvae_.encode(residual), km.labels[:, None], self.last_level)
        err = _rel_error(x, lambda rows: km.centers[km.labels[rows]]
                         + self.rqvae_.reconstruct(v[rows]))
        return PrefixFit(np.column_stack([km.labels, v]), err)

    def _encode_prefix(self, x: np.ndarray) -> np.ndarray:
        k = nearest_center(x, self.cluster_centers_)
        enc = self.rqvae_.encode(x - self.cluster_centers_[k])
        return np.column_stack([k, _fine_codes(enc, k[:, None], self.last_level, self.codes_)])

    def _prefix_sizes(self) -> tuple[int, ...]:
        return (self.n_clusters,) + (self.codebook_size,) * self.n_levels


# --------------------------------------------------------------------------- RQ-VAE only

class RQVAEOnlyIdentifier(IdentifierModel):
    """RQ-VAE on the raw features, no K-Means: `(v_0, v_1..v_M, u)` (TIGER-style semantic IDs).

    CART, Fang et al., ACL 2025, identifier, ablation "w/o K-Means". The first RQ level has
    `n_clusters` codes (taking the place of `k`), the next `n_levels` have `codebook_size`, so
    the identifier has CART's shape and the ablation changes only how the codes are learnt.
    """

    scheme = Scheme.RQVAE_ONLY

    def __init__(
        self,
        *,
        n_clusters: int = 64,
        n_levels: int = 2,
        codebook_size: int = 64,
        latent_dim: int = 32,
        hidden_dim: int = 128,
        epochs: int = 20,
        lr: float = 2e-3,
        beta: float = 0.25,
        batch_size: int = 256,
        seed: int = 0,
        ema_decay: float = 0.95,
        dead_code_threshold: float = 0.1,
        warmup_fraction: float = 0.3,
        normalize_latent: bool = True,
        max_train_items: int = 100_000,
        device: str = "cpu",
        n_threads: int | None = 1,
        last_level: LastLevel | str = LastLevel.NEAREST,
        progress: bool = False,
    ) -> None:
        self.last_level = _last_level(last_level)
        self.n_clusters = check_positive(n_clusters, name="n_clusters", minimum=2)
        self.n_levels, self.codebook_size = _check_levels(n_levels, codebook_size)
        self.seed = seed
        self.n_threads = n_threads
        self.rqvae = RQVAEQuantizer(
            codebook_sizes=(self.n_clusters,) + (self.codebook_size,) * self.n_levels,
            latent_dim=latent_dim, hidden_dim=hidden_dim, epochs=epochs, lr=lr, beta=beta,
            batch_size=batch_size, seed=seed, ema_decay=ema_decay,
            dead_code_threshold=dead_code_threshold, warmup_fraction=warmup_fraction,
            normalize_latent=normalize_latent, max_train_items=max_train_items, device=device,
            n_threads=n_threads,
            progress=progress,
        )

    def _check_data(self, x: np.ndarray) -> None:
        check_n_clusters(self.n_clusters, x.shape[0])

    def _fit_prefix(self, x: np.ndarray) -> PrefixFit:
        self.rqvae_ = copy.deepcopy(self.rqvae).fit(x)
        v = _fine_codes(self.rqvae_.encode(x), _no_head(x), self.last_level)
        return PrefixFit(v, self.rqvae_.reconstruction_error(x, v))

    def _encode_prefix(self, x: np.ndarray) -> np.ndarray:
        return _fine_codes(self.rqvae_.encode(x), _no_head(x), self.last_level, self.codes_)

    def _prefix_sizes(self) -> tuple[int, ...]:
        return self.rqvae.codebook_sizes


# --------------------------------------------------------------------------- K-Means + u

class KMeansUniqueIdentifier(IdentifierModel):
    """`(k, u)`: the coarse K-Means token and the unique token only.

    CART, Fang et al., ACL 2025, identifier without the fine RQ-VAE tokens.
    Reconstruction = the centroid of the item's cluster.
    """

    scheme = Scheme.KMEANS_UNIQUE

    def __init__(self, *, n_clusters: int = 64, seed: int = 0,
                 minibatch_threshold: int = MINIBATCH_THRESHOLD,
                 n_threads: int | None = 1) -> None:
        self.n_clusters = _check_clusters(n_clusters)
        self.seed = seed
        self.minibatch_threshold = minibatch_threshold
        self.n_threads = n_threads

    def _check_data(self, x: np.ndarray) -> None:
        check_n_clusters(self.n_clusters, x.shape[0])

    def _fit_prefix(self, x: np.ndarray) -> PrefixFit:
        km = fit_kmeans(x, n_clusters=self.n_clusters, seed=self.seed,
                        minibatch_threshold=self.minibatch_threshold)
        self.cluster_centers_, self.labels_ = km.centers, km.labels
        return PrefixFit(km.labels[:, None], _rel_error(x, lambda rows: km.centers[km.labels[rows]]))

    def _encode_prefix(self, x: np.ndarray) -> np.ndarray:
        return nearest_center(x, self.cluster_centers_)[:, None]

    def _prefix_sizes(self) -> tuple[int, ...]:
        return (self.n_clusters,)


# --------------------------------------------------------------------------- hierarchical

class HierarchicalKMeansIdentifier(IdentifierModel):
    """DSI-style hierarchical K-Means: `(k, h_1..h_M, u)`.

    CART, Fang et al., ACL 2025, identifier, ablation "w/o RQ-VAE" (Tay et al., DSI, 2022):
    level 0 clusters all items into `n_clusters`; each further level re-clusters the items of
    each parent node, on the raw features (no residuals), into at most `codebook_size` children.
    A node with no more items than `codebook_size` numbers its items 0..n-1 directly (as DSI
    does), so its reconstruction is exact. Reconstruction = the centroid of the deepest node.
    After fit: `nodes_` maps a prefix tuple to its children's centres (C, D).
    """

    scheme = Scheme.HIERARCHICAL_KMEANS

    def __init__(self, *, n_clusters: int = 64, n_levels: int = 2, codebook_size: int = 64,
                 seed: int = 0, minibatch_threshold: int = MINIBATCH_THRESHOLD,
                 n_threads: int | None = 1) -> None:
        self.n_clusters = _check_clusters(n_clusters)
        self.n_levels, self.codebook_size = _check_levels(n_levels, codebook_size)
        self.seed = seed
        self.minibatch_threshold = minibatch_threshold
        self.n_threads = n_threads

    def _check_data(self, x: np.ndarray) -> None:
        check_n_clusters(self.n_clusters, x.shape[0])

    def _fit_prefix(self, x: np.ndarray) -> PrefixFit:
        n = x.shape[0]
        codes = np.zeros((n, self.n_levels + 1), dtype=np.int64)
        sq_err = 0.0  # ‖x − deepest-node centroid‖² summed over items
        self.nodes_: dict[tuple[int, ...], np.ndarray] = {}
        groups = [((), np.arange(n))]
        for level in range(self.n_levels + 1):
            k = self.n_clusters if level == 0 else self.codebook_size
            children = []
            for path, rows in groups:
                sub = x[rows]
                if level > 0 and len(rows) <= k:
                    labels, centers = np.arange(len(rows)), sub.copy()
                else:
                    fit = fit_kmeans(sub, n_clusters=k, seed=self.seed + level,
                                     minibatch_threshold=self.minibatch_threshold)
                    labels, centers = fit.labels, fit.centers
                self.nodes_[path] = centers
                codes[rows, level] = labels
                if level == self.n_levels:
                    sq_err += float(((sub - centers[labels]).astype(np.float64) ** 2).sum())
                for c in np.unique(labels):
                    children.append((path + (int(c),), rows[labels == c]))
            groups = children
        den = float((x.astype(np.float64) ** 2).sum())
        return PrefixFit(codes, math.sqrt(sq_err / den) if den > 0 else 0.0)

    def _encode_prefix(self, x: np.ndarray) -> np.ndarray:
        codes = np.zeros((x.shape[0], self.n_levels + 1), dtype=np.int64)
        paths = np.zeros((x.shape[0], 0), dtype=np.int64)
        for level in range(self.n_levels + 1):
            keys, inv = np.unique(paths, axis=0, return_inverse=True)
            order = np.argsort(inv.reshape(-1), kind="stable")
            bounds = np.searchsorted(inv.reshape(-1)[order], np.arange(len(keys) + 1))
            for g, key in enumerate(keys):
                rows = order[bounds[g]:bounds[g + 1]]
                centers = self.nodes_.get(tuple(int(c) for c in key))
                # A path unseen at fit time (a leaf reached early) has no children: code 0.
                codes[rows, level] = 0 if centers is None else nearest_center(x[rows], centers)
            paths = codes[:, :level + 1]
        return codes

    def _prefix_sizes(self) -> tuple[int, ...]:
        return (self.n_clusters,) + (self.codebook_size,) * self.n_levels


# --------------------------------------------------------------------------- controls

class RandomIdentifier(IdentifierModel):
    """Random codes of CART's shape `(k, v_1..v_M)` + unique token: a control with no semantics.

    CART, Fang et al., ACL 2025, identifier shape, codes drawn uniformly at random.
    Reconstruction = the features' mean (the codes carry no information).
    """

    scheme = Scheme.RANDOM

    def __init__(self, *, n_clusters: int = 64, n_levels: int = 2, codebook_size: int = 64,
                 seed: int = 0) -> None:
        self.n_clusters = _check_clusters(n_clusters)
        self.n_levels, self.codebook_size = _check_levels(n_levels, codebook_size)
        self.seed = seed

    def _check_data(self, x: np.ndarray) -> None:
        check_n_clusters(self.n_clusters, x.shape[0])

    def _draw(self, n: int, n_seen: int) -> np.ndarray:
        # Seeded by (seed, items already coded) so transform is deterministic and fresh per batch.
        rng = np.random.default_rng([self.seed, n_seen])
        return rng.integers(0, np.array(self._prefix_sizes()), size=(n, self.n_levels + 1))

    def _fit_prefix(self, x: np.ndarray) -> PrefixFit:
        self.mean_ = x.mean(0)
        return PrefixFit(self._draw(x.shape[0], 0), _rel_error(x, lambda rows: self.mean_[None]))

    def _encode_prefix(self, x: np.ndarray) -> np.ndarray:
        return self._draw(x.shape[0], len(self.codes_))

    def _prefix_sizes(self) -> tuple[int, ...]:
        return (self.n_clusters,) + (self.codebook_size,) * self.n_levels


class AtomicIdentifier(IdentifierModel):
    """One token per item, a random permutation of 0..N-1 (GRACE's atomic identifiers).

    CART, Fang et al., ACL 2025, baselines (GRACE, Li et al., ACL 2024). A single level of size
    N; it is unique by construction, so there is no separate unique token (`has_unique_token`
    is False). Items added later get N, N+1, … in order. Reconstruction = the features' mean.
    """

    scheme = Scheme.ATOMIC
    has_unique_token = False

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, features: object) -> "AtomicIdentifier":
        x = check_features(features)
        t0 = time.perf_counter()
        self.n_features_in_ = x.shape[1]
        self.mean_ = x.mean(0)
        perm = np.random.default_rng(self.seed).permutation(x.shape[0])
        self.codes_ = perm.astype(np.int64)[:, None]
        self.level_sizes_ = (x.shape[0],)
        self.reconstruction_rel_error_ = _rel_error(x, lambda rows: self.mean_[None])
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def transform(self, features: object) -> np.ndarray:
        x = self._check_new(features)
        return (self.level_sizes_[0] + np.arange(x.shape[0], dtype=np.int64))[:, None]

    def extend(self, features: object) -> np.ndarray:
        new = self.transform(features)
        self.codes_ = np.concatenate([self.codes_, new])
        self.level_sizes_ = (len(self.codes_),)
        return new


# --------------------------------------------------------------------------- factory

def build_identifier_model(
    scheme: Scheme | str,
    *,
    n_clusters: int = 64,
    n_levels: int = 2,
    codebook_size: int = 64,
    latent_dim: int = 32,
    hidden_dim: int = 128,
    epochs: int = 20,
    lr: float = 2e-3,
    beta: float = 0.25,
    batch_size: int = 256,
    seed: int = 0,
    ema_decay: float = 0.95,
    dead_code_threshold: float = 0.1,
    warmup_fraction: float = 0.3,
    normalize_latent: bool = True,
    max_train_items: int = 100_000,
    minibatch_threshold: int = MINIBATCH_THRESHOLD,
    device: str = "cpu",
    n_threads: int | None = 1,
    last_level: LastLevel | str = LastLevel.NEAREST,
    progress: bool = False,
) -> IdentifierModel:
    """An unfitted estimator for `scheme`; the parameters a scheme does not use are ignored,
    but all are validated so a bad config fails whatever the scheme."""
    try:
        scheme = Scheme(scheme)
    except ValueError:
        raise ValueError(f"unknown identifier scheme {scheme!r}; expected one of "
                         f"{[s.value for s in Scheme]}") from None
    _check_clusters(n_clusters)
    _check_levels(n_levels, codebook_size)
    rq = dict(latent_dim=latent_dim, hidden_dim=hidden_dim, epochs=epochs, lr=lr, beta=beta,
              batch_size=batch_size, seed=seed, ema_decay=ema_decay,
              dead_code_threshold=dead_code_threshold, warmup_fraction=warmup_fraction,
              normalize_latent=normalize_latent, max_train_items=max_train_items, device=device,
              n_threads=n_threads, progress=progress)
    shape = dict(n_clusters=n_clusters, n_levels=n_levels, codebook_size=codebook_size)
    RQVAEQuantizer(codebook_sizes=(codebook_size,) * n_levels, **rq)  # validates; cheap
    last_level = _last_level(last_level)
    if scheme is Scheme.CART:
        return CartIdentifier(**shape, **rq, last_level=last_level,
                              minibatch_threshold=minibatch_threshold)
    if scheme is Scheme.RQVAE_ONLY:
        return RQVAEOnlyIdentifier(**shape, **rq, last_level=last_level)
    if scheme is Scheme.HIERARCHICAL_KMEANS:
        return HierarchicalKMeansIdentifier(**shape, seed=seed, n_threads=n_threads,
                                            minibatch_threshold=minibatch_threshold)
    if scheme is Scheme.KMEANS_UNIQUE:
        return KMeansUniqueIdentifier(n_clusters=n_clusters, seed=seed, n_threads=n_threads,
                                      minibatch_threshold=minibatch_threshold)
    if scheme is Scheme.RANDOM:
        return RandomIdentifier(**shape, seed=seed)
    return AtomicIdentifier(seed=seed)
