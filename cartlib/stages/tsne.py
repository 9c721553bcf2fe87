"""Stage `tsne`: the paper's Figure 5 analogue — do items that share an identifier prefix sit together?

t-SNE (scikit-learn) of test-gallery item features, coloured (a) by the first identifier token
(the K-Means cluster ``k``), (b) inside the largest coarse cluster, by the second token (the first
RQ-VAE code ``v_1``), and (c) the same as (a) for the random-code control. Panel (b) takes every item of
that cluster in the identifier table (train and test galleries): the test gallery alone leaves ~25
items spread over ~20 second tokens, too few to see anything. The number that carries
the picture is computed in the feature space itself, not in the 2-D map (t-SNE distorts distances):

    prefix ratio = mean cosine distance between items with the same prefix
                   / mean cosine distance between items with different prefixes

< 1 means a prefix groups similar items; ≈ 1 means it carries no semantics (the random control).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from cartlib.config import Params
from cartlib.data import schema
from cartlib.data.features import load_features
from cartlib.data.idstore import load_identifiers
from cartlib.paths import TaskPaths
from cartlib.results import publish


class TsneResult(NamedTuple):
    # panel ("a_c": the test items of panels a and c; "b": the cluster of panel b), item_id, x, y, k, v1, random_k
    points: pd.DataFrame
    metrics: dict
    figure: object
    mlflow_run_id: str | None


def prefix_ratio(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean cosine distance within a label over mean cosine distance across labels (unit vectors)."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    dist = 1.0 - x @ x.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(x), dtype=bool)
    within, between = dist[same & off], dist[~same]
    if not len(within) or not len(between):
        return float("nan")
    return float(within.mean() / between.mean())


def embed_2d(features: np.ndarray, *, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, (len(features) - 1) / 3)  # sklearn needs perplexity < n
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                metric="cosine").fit_transform(features)


def _scatter(ax, xy: np.ndarray, labels: np.ndarray, *, n_top: int, title: str) -> None:
    values, counts = np.unique(labels, return_counts=True)
    top = values[np.argsort(-counts, kind="stable")[:n_top]]
    rest = ~np.isin(labels, top)
    ax.scatter(xy[rest, 0], xy[rest, 1], s=6, c="lightgrey", label="other prefixes")
    cmap = __import__("matplotlib").colormaps["tab10" if n_top <= 10 else "tab20"]
    for i, v in enumerate(top):
        sel = labels == v
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, color=cmap(i % cmap.N), label=f"{v} ({sel.sum()})")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=1.5, loc="best", title="prefix (items)", title_fontsize=6)


def run(params: Params, paths: TaskPaths, *, progress: bool = True) -> TsneResult:
    cfg = params.tsne
    dataset = schema.load_dataset(paths.dataset, verify_hashes=False)
    feats = load_features(paths.features, dataset)
    item_ids = dataset.items["item_id"].to_numpy()
    cart = load_identifiers(paths.data / "identifiers", params.identifiers.scheme, item_ids=item_ids)
    random = load_identifiers(paths.data / "identifiers", "random", item_ids=item_ids)
    test = np.flatnonzero(dataset.items["split"].to_numpy() == "test")
    rows = np.sort(np.random.default_rng(params.base.seed).choice(test, size=min(cfg.n_items, len(test)),
                                                                    replace=False))
    x = feats.items[rows]
    k, v1, rk = cart.codes[rows, 0], cart.codes[rows, 1], random.codes[rows, 0]
    xy = embed_2d(x, perplexity=cfg.perplexity, seed=params.base.seed)
    # inside the largest coarse cluster: its own t-SNE, coloured by the second token
    values, counts = np.unique(k, return_counts=True)
    big = values[np.argmax(counts)]
    inner = np.flatnonzero(cart.codes[:, 0] == big)  # all items of the cluster, train and test
    x_in, v1_in = feats.items[inner], cart.codes[inner, 1]
    inner_xy = embed_2d(x_in, perplexity=min(cfg.perplexity, 10.0), seed=params.base.seed) \
        if len(inner) >= 8 else np.zeros((len(inner), 2))

    metrics = {
        "n_items": int(len(rows)),
        "prefix_ratio_first_token": prefix_ratio(x, k),
        "prefix_ratio_first_token_random": prefix_ratio(x, rk),
        "prefix_ratio_second_token_in_cluster": prefix_ratio(x_in, v1_in),
        "prefix_ratio_first_two_tokens": prefix_ratio(x, k * 100000 + v1),
        "largest_cluster": int(big),
        "largest_cluster_items": int(len(inner)),
    }
    points = pd.concat([
        pd.DataFrame({"panel": "a_c", "item_id": item_ids[rows], "x": xy[:, 0], "y": xy[:, 1], "k": k, "v1": v1,
                      "random_k": rk}),
        pd.DataFrame({"panel": "b", "item_id": item_ids[inner], "x": inner_xy[:, 0], "y": inner_xy[:, 1],
                      "k": big, "v1": v1_in, "random_k": random.codes[inner, 0]}),
    ], ignore_index=True)

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    n_top = cfg.n_top_clusters
    _scatter(axes[0], xy, k, n_top=n_top,
             title=f"(a) CART: first token k (ratio {metrics['prefix_ratio_first_token']:.2f})")
    _scatter(axes[1], inner_xy, v1_in, n_top=n_top,
             title=f"(b) all {len(inner)} items of cluster k={big}: second token v1 (ratio "
                   f"{metrics['prefix_ratio_second_token_in_cluster']:.2f})")
    _scatter(axes[2], xy, rk, n_top=n_top,
             title=f"(c) random codes: first token (ratio {metrics['prefix_ratio_first_token_random']:.2f})")
    fig.suptitle(f"{paths.task}: t-SNE of {len(rows)} test items by identifier prefix "
                 "(ratio = mean cosine distance within a prefix / between prefixes; < 1 = prefixes group "
                 "similar items)", fontsize=10)
    fig.tight_layout()
    run_id = publish(paths, "tsne", params=params, metrics=metrics, tables={"points": points},
                     figures={"tsne_prefixes": fig})
    return TsneResult(points, metrics, fig, run_id)
