"""K-Means for the coarse token `k`, plus the input checks every identifier builder shares.

scikit-learn does the clustering (KMeans, or MiniBatchKMeans on large galleries); this module
only fixes the seed handling, the large-N switch and the error messages.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

# Above this many items, full-batch Lloyd iterations cost seconds per pass on 2 cores.
MINIBATCH_THRESHOLD = 50_000


@contextlib.contextmanager
def thread_limit(n_threads: int | None) -> Iterator[None]:
    """Cap torch and BLAS/OpenMP threads inside the block, restoring them afterwards.

    On a shared CPU, small matmuls with several spinning OpenMP threads run 10-30x slower than
    on one thread; `None` leaves the process settings alone.
    """
    if n_threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        with threadpool_limits(limits=n_threads):
            yield
    finally:
        torch.set_num_threads(before)


def check_features(features: object, *, name: str = "features") -> np.ndarray:
    """Return `features` as a C-contiguous float32 (N, D) array, or raise ValueError.

    Checked before any fitting so a bad table fails in milliseconds, not after an epoch.
    """
    try:
        x = np.asarray(features, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot convert to a float array ({exc})") from None
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N items, D dims); got ndim={x.ndim}, shape={x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape={x.shape}")
    finite = np.isfinite(x)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ValueError(
            f"{name} contain NaN/inf: {int((~finite).sum())} values, first at item {row}, "
            f"dim {col} (value {x[row, col]})"
        )
    return np.ascontiguousarray(x)


def check_n_clusters(n_clusters: int, n_items: int, *, name: str = "n_clusters") -> None:
    """K-Means needs at least as many items as clusters."""
    if n_clusters > n_items:
        raise ValueError(f"{name}={n_clusters} is larger than the number of items N={n_items}")


def check_positive(value: int, *, name: str, minimum: int = 1) -> int:
    """Validate an integer hyperparameter at construction time (fail before any fitting)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


class KMeansFit(NamedTuple):
    centers: np.ndarray  # (K, D) float32
    labels: np.ndarray  # (N,) int64


def fit_kmeans(
    features: np.ndarray,
    *,
    n_clusters: int,
    seed: int,
    n_init: int = 1,
    max_iter: int = 100,
    minibatch_threshold: int = MINIBATCH_THRESHOLD,
    batch_size: int = 4096,
) -> KMeansFit:
    """Cluster (N, D) features into `n_clusters`; MiniBatchKMeans above `minibatch_threshold`.

    Callers pass already-checked features (see `check_features`).
    """
    check_n_clusters(n_clusters, features.shape[0])
    if features.shape[0] > minibatch_threshold:
        km = MiniBatchKMeans(
            n_clusters=n_clusters, random_state=seed, n_init=n_init,
            max_iter=max_iter, batch_size=batch_size,
        )
    else:
        km = KMeans(n_clusters=n_clusters, random_state=seed, n_init=n_init, max_iter=max_iter)
    with warnings.catch_warnings():
        # Fewer distinct points than clusters is legal here (tiny groups, duplicates): the
        # surplus clusters stay empty and the unique token separates identical items.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = km.fit_predict(features)
    return KMeansFit(km.cluster_centers_.astype(np.float32), labels.astype(np.int64))


def nearest_center(features: np.ndarray, centers: np.ndarray, *, batch: int = 65_536) -> np.ndarray:
    """(N, D), (K, D) -> (N,) int64 index of the nearest center (squared Euclidean), in batches."""
    c_sq = (centers.astype(np.float64) ** 2).sum(1)  # (K,)
    out = np.empty(features.shape[0], dtype=np.int64)
    for start in range(0, features.shape[0], batch):
        x = features[start:start + batch].astype(np.float64)
        # ||x||² is constant per row, so argmin over -2 x·c + ||c||² suffices.
        scores = c_sq[None, :] - 2.0 * x @ centers.T.astype(np.float64)  # (B, K)
        out[start:start + batch] = np.argmin(scores, 1)
    return out


class KMeansQuantizer:
    """Coarse token `k` of the identifier: K-Means over item features.

    CART, Fang et al., ACL 2025, identifier: `k` is the K-Means cluster of the candidate's
    feature vector, the coarse and most important token; the fine tokens quantise the residual
    `x - centroid_k` (see `residual`).

    Attributes after `fit`: `cluster_centers_` (K, D), `labels_` (N,) int64.
    """

    def __init__(
        self,
        *,
        n_clusters: int = 64,
        seed: int = 0,
        n_init: int = 1,
        max_iter: int = 100,
        minibatch_threshold: int = MINIBATCH_THRESHOLD,
    ) -> None:
        self.n_clusters = check_positive(n_clusters, name="n_clusters")
        self.seed = seed
        self.n_init = check_positive(n_init, name="n_init")
        self.max_iter = check_positive(max_iter, name="max_iter")
        self.minibatch_threshold = minibatch_threshold

    def fit(self, features: object) -> "KMeansQuantizer":
        x = check_features(features)
        check_n_clusters(self.n_clusters, x.shape[0])
        fit = fit_kmeans(
            x, n_clusters=self.n_clusters, seed=self.seed, n_init=self.n_init,
            max_iter=self.max_iter, minibatch_threshold=self.minibatch_threshold,
        )
        self.cluster_centers_ = fit.centers
        self.labels_ = fit.labels
        return self

    def predict(self, features: object) -> np.ndarray:
        """(N, D) -> (N,) int64 cluster of each item."""
        x = check_features(features)
        self._check_dim(x)
        return nearest_center(x, self.cluster_centers_)

    def residual(self, features: object, labels: np.ndarray | None = None) -> np.ndarray:
        """(N, D) -> (N, D) float32 `x - centroid_k` (labels predicted when not given)."""
        x = check_features(features)
        self._check_dim(x)
        k = self.predict(x) if labels is None else np.asarray(labels, dtype=np.int64)
        return x - self.cluster_centers_[k]

    def _check_dim(self, x: np.ndarray) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("KMeansQuantizer is not fitted; call fit(features) first")
        if x.shape[1] != self.cluster_centers_.shape[1]:
            raise ValueError(
                f"features have D={x.shape[1]} dims; the model was fitted on "
                f"D={self.cluster_centers_.shape[1]}"
            )
