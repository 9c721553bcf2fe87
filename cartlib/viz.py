"""Figures: each function returns a matplotlib Figure and does no file I/O."""
from __future__ import annotations

import textwrap
from typing import NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: notebooks still show the returned Figure inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def _wrap(text: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(text, width))


def media_samples(task: str, media: np.ndarray, captions: list[str], pseudo: list[str], *, n: int = 4):
    """A few items with one reference caption and one pseudo-caption each."""
    n = min(n, len(media))
    if task == "video":
        frames = media.shape[1]
        fig, axes = plt.subplots(n, frames, figsize=(1.3 * frames, 1.9 * n), squeeze=False)
        for i in range(n):
            for t in range(frames):
                axes[i, t].imshow(media[i, t])
                axes[i, t].axis("off")
            axes[i, 0].set_title(_wrap(f"ref: {captions[i]}  |  pseudo: {pseudo[i]}", 110), fontsize=7, loc="left")
    else:
        fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.6), squeeze=False)
        for i in range(n):
            ax = axes[0, i]
            if task == "image":
                ax.imshow(media[i])
                ax.axis("off")
            else:
                from matplotlib import mlab

                spec, freqs, times = mlab.specgram(np.asarray(media[i], dtype=np.float32), NFFT=512, Fs=16000, noverlap=256)
                ax.pcolormesh(times, freqs, 10 * np.log10(spec + 1e-10), shading="auto", cmap="magma")
                ax.set_xlabel("s")
                ax.set_ylabel("Hz")
            ax.set_title(_wrap(f"ref: {captions[i]}") + "\n" + _wrap(f"pseudo: {pseudo[i]}"), fontsize=7)
    fig.suptitle(f"{task}: rendered items with a reference caption and a pseudo-caption", fontsize=9)
    fig.tight_layout()
    return fig


def caption_samples(names: list[str], captions: list[str], pseudo: list[str], *, title: str):
    """Text-only panel for datasets whose media stay in files: name, reference and pseudo-caption."""
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.9 * len(names)))
    ax.axis("off")
    lines = [f"{n}\n   ref: {_wrap(c, 90)}\n   pseudo: {p}" for n, c, p in zip(names, captions, pseudo)]
    ax.text(0, 1, "\n\n".join(lines), va="top", fontsize=8, family="monospace")
    ax.set_title(title, fontsize=9)
    return fig


def training_curve(history: pd.DataFrame, *, title: str, metric: str = "loss"):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history["epoch"], history[metric], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def code_usage(usage: pd.DataFrame, *, title: str):
    """Bar chart of the fraction of codes used per level, one group per scheme.

    usage: columns scheme, level, code_usage.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    schemes = list(dict.fromkeys(usage["scheme"]))
    levels = sorted(usage["level"].unique())
    width = 0.8 / max(len(levels), 1)
    for j, level in enumerate(levels):
        sub = usage[usage["level"] == level].set_index("scheme").reindex(schemes)
        ax.bar(np.arange(len(schemes)) + j * width, sub["code_usage"], width, label=f"level {level}")
    ax.set_xticks(np.arange(len(schemes)) + width * (len(levels) - 1) / 2, schemes, rotation=20, fontsize=8)
    ax.set_ylabel("fraction of codes used")
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def cluster_sizes(codes: np.ndarray, *, title: str):
    """Histogram of items per coarse token (level 0) and per full prefix before the unique token."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    _, per_k = np.unique(codes[:, 0], return_counts=True)
    _, per_prefix = np.unique(codes[:, :-1], axis=0, return_counts=True)
    axes[0].hist(per_k, bins=30)
    axes[0].set_xlabel("items per coarse token k")
    axes[1].hist(per_prefix, bins=np.arange(1, per_prefix.max() + 2) - 0.5)
    axes[1].set_xlabel("items per prefix (before u)")
    for ax in axes:
        ax.set_ylabel("count")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ tutorial
def level_names(n_levels: int) -> list[str]:
    """Names of CART's identifier levels `(k, v1..vM, u)` for M = `n_levels` RQ-VAE levels."""
    return ["k", *(f"v{m}" for m in range(1, n_levels + 1)), "u"]


class TreeLayout(NamedTuple):
    """Drawing positions of a prefix tree: nodes by (depth, prefix), leaves in lexicographic order."""

    nodes: dict[tuple[int, ...], tuple[float, float]]  # prefix (length = depth) -> (x = depth, y)
    edges: list[tuple[tuple[int, ...], tuple[int, ...]]]  # (parent prefix, child prefix)
    leaves: list[int]  # gallery rows, top to bottom


def tree_layout(codes: np.ndarray, *, clusters: Sequence[int]) -> TreeLayout:
    """Layout of the prefix tree of the items whose coarse token is in `clusters`.

    Leaves (full identifiers) sit at y = 0, 1, 2, … in lexicographic order; every inner node at
    the mean y of its children; x is the depth (0 = root).
    """
    codes = np.asarray(codes)
    keep = np.flatnonzero(np.isin(codes[:, 0], list(clusters)))
    if keep.size == 0:
        raise ValueError(f"no item has a coarse token in {list(clusters)}")
    order = keep[np.lexsort(codes[keep].T[::-1])]
    depth = codes.shape[1]
    ys: dict[tuple[int, ...], list[float]] = {}
    for y, row in enumerate(order):
        ident = tuple(int(c) for c in codes[row])
        for d in range(depth + 1):
            ys.setdefault(ident[:d], []).append(float(y))
    nodes = {p: (float(len(p)), float(np.mean(v))) for p, v in ys.items()}
    edges = [(p[:-1], p) for p in nodes if p]
    return TreeLayout(nodes, edges, [int(r) for r in order])


def plot_items(data, *, n: int = 4):
    """Tutorial step 1: rendered items with a reference caption and a pseudo-caption; ``data``: a
    :class:`cartlib.tutorial.TutorialData` (``task``, ``media``, ``captions``, ``pseudo_captions``)."""
    fig = media_samples(data.task, data.media[:n], [c[0] for c in data.captions[:n]],
                            [p[0] for p in data.pseudo_captions[:n]], n=n)
    fig.suptitle(f"{data.task}: rendered items with a reference caption and a pseudo-caption", fontsize=9,
                 y=1.04)  # above the captions
    return fig


def _pca(x: np.ndarray):
    """A 2-component PCA fitted on `x` (N, D)."""
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=0).fit(x)


def plot_clusters(features: np.ndarray, *, labels: np.ndarray, centers: np.ndarray):
    """Tutorial step 2: item features in 2-D (PCA) coloured by K-Means cluster, centroids as crosses."""
    pca = _pca(features)
    xy, cxy = pca.transform(features), pca.transform(centers)
    k = len(centers)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1.4, 1]})
    cmap = plt.get_cmap("tab20", max(k, 2))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=cmap, vmin=-0.5, vmax=k - 0.5, s=14, alpha=0.8)
    ax.scatter(cxy[:, 0], cxy[:, 1], c=np.arange(k), cmap=cmap, vmin=-0.5, vmax=k - 0.5, marker="X", s=140,
               edgecolors="black", linewidths=1.0)
    for i, (x, y) in enumerate(cxy):
        ax.annotate(str(i), (x, y), fontsize=7, ha="center", va="center", color="white", weight="bold")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"item features (PCA of {features.shape[1]}-d) and the K = {k} centroids", fontsize=9)
    sizes = np.bincount(labels, minlength=k)
    bx.bar(np.arange(k), sizes, color=[cmap(i) for i in range(k)])
    bx.set_xticks(np.arange(0, k, max(1, k // 8)))
    bx.set_xlabel("coarse token k")
    bx.set_ylabel("items")
    bx.set_title("items per cluster", fontsize=9)
    fig.tight_layout()
    return fig


def plot_residuals(features: np.ndarray, *, labels: np.ndarray, centers: np.ndarray):
    """Tutorial step 3: the residuals x − centroid_k: all clusters move to the origin, and they are small."""
    residual = features - centers[labels]
    comps = _pca(features).components_  # the axes of the cluster plot, so the scales compare
    xy = (features - features.mean(0)) @ comps.T
    rxy = residual @ comps.T  # residuals are centred on 0 already (centroids are cluster means)
    k = len(centers)
    cmap = plt.get_cmap("tab20", max(k, 2))
    lim = 1.05 * np.abs(xy).max()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, pts, title in ((axes[0], xy, "features x (centred)"), (axes[1], rxy, "residuals x − centroid_k")):
        ax.scatter(pts[:, 0], pts[:, 1], c=labels, cmap=cmap, vmin=-0.5, vmax=k - 0.5, s=12, alpha=0.8)
        ax.set_title(f"{title}, same PCA axes", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
    norms, res_norms = np.linalg.norm(features, axis=1), np.linalg.norm(residual, axis=1)
    bins = np.linspace(0.0, 1.05 * max(norms.max(), res_norms.max(), 1e-6), 42)  # shared: unit norms are one spike
    axes[2].hist(norms, bins=bins, alpha=0.7, label="‖x‖")
    axes[2].hist(res_norms, bins=bins, alpha=0.7, label="‖x − centroid_k‖")
    axes[2].legend(fontsize=8)
    axes[2].set_xlabel("norm")
    axes[2].set_title("what the RQ-VAE still has to encode", fontsize=9)
    fig.tight_layout()
    return fig


def plot_rqvae_levels(identifier, features: np.ndarray):
    """Tutorial step 4: items per code at every RQ-VAE level, and the error left after each level.

    `identifier`: a fitted `cartlib.ids.schemes.CartIdentifier`.
    """
    rq = identifier.rqvae_
    codes = identifier.codes_
    m = len(rq.codebook_sizes)
    centroid = identifier.cluster_centers_[identifier.labels_]
    den = np.linalg.norm(features)
    errors = [np.linalg.norm(features - centroid) / den]
    for level in range(1, m + 1):  # centroid + the residual decoded from the first `level` codes
        x_hat = centroid + rq.reconstruct(codes[:, 1:1 + m], n_levels=level)
        errors.append(np.linalg.norm(features - x_hat) / den)
    fig, axes = plt.subplots(1, m + 2, figsize=(3.2 * (m + 2), 3.3))
    for level in range(m):
        counts = np.bincount(codes[:, 1 + level], minlength=rq.codebook_sizes[level])
        p = counts[counts > 0] / counts.sum()
        axes[level].bar(np.arange(len(counts)), counts)
        axes[level].set_title(f"level v{level + 1}: {int((counts > 0).sum())}/{len(counts)} codes used, "
                              f"perplexity {np.exp(-(p * np.log(p)).sum()):.1f}", fontsize=8)
        axes[level].set_xlabel("code")
        axes[level].set_ylabel("items")
    hist = pd.DataFrame([s._asdict() for s in rq.history_])
    axes[m].plot(np.arange(1, len(hist) + 1), hist["reconstruction_loss"], marker=".")
    n_warmup = round(rq.epochs * rq.warmup_fraction)
    if n_warmup:
        axes[m].axvline(n_warmup + 0.5, color="grey", ls="--", lw=0.8)
    axes[m].set_xlabel("epoch")
    axes[m].set_title("RQ-VAE reconstruction loss\n(auto-encoder warm-up, then quantised)", fontsize=8)
    names = ["centroid"] + ["+ v1" if level == 1 else f"+ v1..v{level}" for level in range(1, m + 1)]
    axes[m + 1].bar(names, errors, color="tab:purple")
    axes[m + 1].set_ylabel("‖x − x̂‖ / ‖x‖")
    axes[m + 1].set_title("error left after each level", fontsize=8)
    fig.tight_layout()
    return fig


def plot_identifier_tree(codes: np.ndarray, *, clusters: Sequence[int], labels: Sequence[str], width: int = 64):
    """Tutorial step 5: the prefix tree (identifier tree) of the items in a few clusters.

    Columns are the identifier levels `(k, v1..vM, u)`, each leaf one item with its label; items
    that share a prefix share a path from the root. This is the tree the beam search walks.
    """
    lay = tree_layout(codes, clusters=clusters)
    depth = codes.shape[1]
    names = level_names(depth - 2)
    n_leaves = len(lay.leaves)
    fig, ax = plt.subplots(figsize=(11, 0.8 + 0.22 * n_leaves))
    for parent, child in lay.edges:
        (x0, y0), (x1, y1) = lay.nodes[parent], lay.nodes[child]
        ax.plot([x0, x0 + 0.5, x1], [y0, y1, y1], color="grey", lw=0.7)
    for prefix, (x, y) in lay.nodes.items():
        ax.scatter([x], [y], s=120 if prefix else 200, color="white" if prefix else "black", edgecolors="black",
                   zorder=3)
        if prefix:
            ax.annotate(str(prefix[-1]), (x, y), fontsize=6.5, ha="center", va="center", zorder=4)
    for y, row in enumerate(lay.leaves):
        text = labels[row] if len(labels[row]) <= width else labels[row][:width - 1] + "…"
        ax.annotate(f"{text}", (depth + 0.25, y), fontsize=7, va="center")
    ax.set_xticks(range(depth + 1), ["root", *names])
    ax.xaxis.tick_top()
    ax.set_xlim(-0.3, depth + 3.8)
    ax.set_ylim(n_leaves - 0.5, -0.8)
    ax.set_yticks([])
    for side in ("right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"identifier tree of clusters k in {[int(c) for c in clusters]}: {n_leaves} items", fontsize=9,
                 pad=18)
    fig.tight_layout()
    return fig


def plot_training(history: Sequence[dict] | pd.DataFrame):
    """Tutorial step 6: CART's training loss (CE + ω·KL) and its two parts per epoch."""
    h = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(h["epoch"], h["loss"], marker="o", label="loss = CE + ω·KL")
    axes[0].plot(h["epoch"], h["ce"], marker=".", label="CE (identifier tokens)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].plot(h["epoch"], h["kl"], marker="o", color="tab:orange")
    axes[1].set_title("symmetric KL between two dropout passes (R-Drop)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_title("training loss", fontsize=9)
    fig.tight_layout()
    return fig


_STATUS_COLOURS = {"kept": "tab:green", "cut by beam width": "lightgrey", "removed by prefix constraint": "tab:red"}


def plot_beam_trace(candidates: pd.DataFrame, summary: pd.DataFrame, *, names: Sequence[str] | None = None):
    """Tutorial step 7: at each level the best candidates (beam prefix → next code) by the model's score.

    ``candidates``: :func:`cartlib.tutorial.trace_frame` (columns level, prefix, code, score, status);
    ``summary``: :func:`cartlib.tutorial.trace_summary` (level, beams_in, valid_next, all_next).
    Green: kept as a beam; grey: valid but outside the beam width; red: removed by the prefix
    constraint (no gallery identifier continues that way). Bar length: the candidate's
    probability p(prefix, code | query) = exp(score).
    """
    depth = len(summary)
    names = list(names) if names is not None else [f"level {l}" for l in range(depth)]
    top = int(candidates.groupby("level").size().max())
    fig, axes = plt.subplots(1, depth, figsize=(3.4 * depth, 0.9 + 0.3 * top), squeeze=False)
    for l, ax in enumerate(axes[0]):
        frame = candidates[candidates["level"] == l]
        t = summary.iloc[l]
        labels = ["·".join(map(str, p)) + f" → {c}" if p else f"→ {c}" for p, c in zip(frame["prefix"], frame["code"])]
        ax.barh(np.arange(len(frame)), np.exp(frame["score"]), color=[_STATUS_COLOURS[s] for s in frame["status"]])
        ax.set_yticks(np.arange(len(frame)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{names[l]}: {t.beams_in} beam(s) in\n{t.valid_next} of {t.all_next} next codes valid",
                     fontsize=8)
        ax.set_xlabel("p(prefix → code | query)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _STATUS_COLOURS.values()]
    fig.legend(handles, list(_STATUS_COLOURS), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_fusion_alpha(alpha: np.ndarray | None, *, fusion_mode: str = ""):
    """Tutorial step 8: the fine-branch weights α ``(n_layers, S, D)`` (each decoder layer's mix of
    the S encoder layers; :func:`cartlib.tutorial.fusion_alpha`), None without a fine branch.

    Left: α averaged over the feature dimensions (rows: decoder layers; columns: encoder layers;
    uniform = 1/S). Right: for each decoder layer, the share of feature dimensions whose largest
    weight is on each encoder layer.
    """
    if alpha is None:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"fusion mode {fusion_mode}: no fine branch, no α", ha="center", va="center")
        return fig
    n_dec, s, _ = alpha.shape
    mean = alpha.mean(-1)  # (n_dec, S)
    share = np.stack([np.bincount(a.argmax(0), minlength=s) / a.shape[1] for a in alpha])
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.4 + 0.6 * n_dec))
    spread = max(float(np.abs(mean - 1 / s).max()), 1e-6)
    panels = ((axes[0], mean, f"mean α over dims (uniform: 1/S = {1 / s:.4f})", "{:.4f}",
               dict(cmap="coolwarm", vmin=1 / s - spread, vmax=1 / s + spread)),
              (axes[1], share, "share of dims whose largest α is this layer", "{:.2f}", dict(cmap="viridis")))
    for ax, values, title, fmt, style in panels:
        im = ax.imshow(values, aspect="auto", **style)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(s), [f"E{j + 1}" for j in range(s)])
        ax.set_yticks(range(n_dec), [f"decoder {i + 1}" for i in range(n_dec)])
        ax.set_xlabel("encoder layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def plot_recall(table: pd.DataFrame, *, n_candidates: int):
    """Tutorial step 9: Recall@1/5/10 and MRR@10 of each method (rows of `recall_table`)."""
    cols = ["recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(table)
    for i, (name, row) in enumerate(table.iterrows()):
        bars = ax.bar(np.arange(len(cols)) + i * width, row[cols].astype(float), width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(cols)) + width * (len(table) - 1) / 2, ["R@1", "R@5", "R@10", "MRR@10"])
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    q = int(table["n_queries"].iloc[0])
    ax.set_title(f"{q} held-out test queries against {n_candidates} items", fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ throughput
_THROUGHPUT_STYLE = {  # system -> (colour, marker)
    "cart_end_to_end": ("#1f77b4", "o"), "cart_decode": ("#d62728", "o"), "unconstrained_decode": ("#ff9896", "v"),
    "dual_tower_exact": ("#2ca02c", "s"), "faiss_flat": ("#7f7f7f", "s"), "faiss_ivf": ("#9467bd", "^"),
    "faiss_hnsw": ("#8c564b", "D")}


def throughput_figure(table, *, systems: Sequence[str], ratio_batch: int, crossover, caption: str = "",
                      extra: Sequence = (), gpu=None, gpu_batch: int = 1024, gpu_note: str = ""):
    """Queries/s against candidates (log–log), one panel per device of ``table`` and of the
    ``extra`` tables; colour = system (in the order of ``systems``), line style = batch size
    (``ratio_batch``, or the closest, solid); the point ``crossover(rows, batch_size=…)`` (where
    cart_decode overtakes dual_tower_exact) marked. Returns a matplotlib Figure (no file I/O).

    ``gpu``: the ``decode`` rows of a GPU check (``scripts/gpu_check.py``; columns ``system``,
    ``device``, ``n_candidates``, ``batch_size``, ``qps``, ``precision``, ``input``): one more panel
    per GPU, queries/s of CART constrained / unconstrained decoding and the exact dual tower from
    encoded queries at batch ``gpu_batch`` (or the closest measured), with the crossover. None: that
    panel says that no GPU rows exist and how to make them (``gpu_note``).

    The benchmark's constants and analysis come in as arguments so that this module, which every
    stage imports, does not import the benchmark (and, through it, the model)."""
    from matplotlib.lines import Line2D

    SYSTEMS, RATIO_BATCH = tuple(systems), ratio_batch

    frames = [f for f in (table, *extra) if f is not None and len(f)]
    data = pd.concat(frames, ignore_index=True) if frames else table
    # a CSV appended to by several runs: the latest row of each (system, device, N, batch) wins
    data = data.drop_duplicates(subset=["system", "device", "n_candidates", "batch_size"], keep="last")
    devices = list(dict.fromkeys(data["device"])) or ["(no rows)"]
    gpu_rows = None
    gpu_devices: list = [None]  # one placeholder panel when there are no GPU rows
    if gpu is not None:
        gpu_rows = gpu[(gpu["input"] == "encoded") & gpu["qps"].notna()
                       & gpu["system"].isin(["cart_decode", "unconstrained_decode", "dual_tower_exact"])]
        gpu_devices = list(dict.fromkeys(gpu_rows["device"])) or [None]
    n_panels = len(devices) + len(gpu_devices)
    fig, axes = plt.subplots(1, n_panels, figsize=(6.2 * n_panels, 4.8), squeeze=False)
    for ax, dev in zip(axes[0], devices):
        sub = data[(data["device"] == dev) & data["qps"].notna()]
        batches = sorted(set(sub["batch_size"]))
        main = min(batches, key=lambda b: (abs(b - RATIO_BATCH), b)) if batches else None
        styles = {b: "-" if b == main else (":" if b < (main or 0) else "--") for b in batches}
        for system in SYSTEMS:
            colour, marker = _THROUGHPUT_STYLE[system]
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
        _log_axes(ax, str(dev))
        handles = [Line2D([], [], color=_THROUGHPUT_STYLE[s][0], marker=_THROUGHPUT_STYLE[s][1], label=s) for s in SYSTEMS
                   if s in set(sub["system"])]
        handles += [Line2D([], [], color="black", ls=styles[b], lw=2.0 if b == main else 1.0, label=f"batch {b}")
                    for b in batches]
        ax.legend(handles=handles, fontsize=7, loc="best", ncol=2)
    for ax, dev in zip(axes[0][len(devices):], gpu_devices):
        if dev is None:
            ax.axis("off")
            ax.text(0.5, 0.5, "GPU panel: no GPU rows\n(results/throughput/throughput_gpu.csv is absent)\n\n"
                    + "\n".join(textwrap.wrap(gpu_note, 48)), ha="center", va="center", fontsize=9,
                    transform=ax.transAxes, bbox=dict(boxstyle="round", fc="#f4f4f4", ec="#999999"))
            ax.set_title("GPU (not measured)", fontsize=10)
            continue
        sub = gpu_rows[gpu_rows["device"] == dev].astype({"n_candidates": "float64", "batch_size": "float64",
                                                          "qps": "float64"})
        have = sorted(set(sub["batch_size"]))
        b = min(have, key=lambda x: (abs(x - gpu_batch), -x))
        sub = sub[sub["batch_size"] == b]
        precision = {s: p for s, p in zip(sub["system"], sub["precision"])}
        for system, label in (("cart_decode", "CART constrained"), ("unconstrained_decode", "CART unconstrained"),
                              ("dual_tower_exact", "dual tower, exact")):
            pts = sub[sub["system"] == system].sort_values("n_candidates")
            if len(pts):
                colour, marker = _THROUGHPUT_STYLE[system]
                p = precision.get(system, "")
                ax.plot(pts["n_candidates"], pts["qps"], "-", color=colour, marker=marker, ms=5, lw=2.0,
                        label=f"{label} ({p})" if p and p != "nan" else label)
        cross = crossover(sub, batch_size=b)
        if cross is not None:
            ax.plot([cross[0]], [cross[1]], "*", color="black", ms=14, zorder=5)
            ax.annotate(f"CART overtakes exact\nN ≈ {cross[0]:,.0f}", cross, textcoords="offset points",
                        xytext=(8, -26), fontsize=8)
        beam = sub["beam"].dropna() if "beam" in sub else ()
        _log_axes(ax, f"{dev} — batch {int(b):,}" + (f", beam {int(beam.iloc[0])}" if len(beam) else ""))
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Figure 4 analogue: throughput as the gallery grows (CART decoding vs dual-tower / FAISS)",
                 fontsize=11)
    if caption:
        fig.text(0.01, -0.01, "\n".join(textwrap.wrap(caption, 115 * n_panels)), fontsize=7, va="top",
                 ha="left")
    fig.tight_layout()
    return fig


def _log_axes(ax, title: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("candidates N")
    ax.set_ylabel("queries / s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)


def caption_examples(examples: pd.DataFrame, *, title: str):
    """A few items as text: a reference caption, the pseudo-captions and (if given) the nearest-train baseline's."""
    rows = examples.to_dict("records")
    fig, ax = plt.subplots(figsize=(11, 0.9 + 1.35 * max(1, len(rows))))
    ax.axis("off")
    lines = []
    for r in rows:
        lines.append(f"{r['item_id']} ({r.get('split', '')})")
        lines.append(_wrap(f"    reference: {r['reference']}", 130))
        lines.append(_wrap(f"    pseudo:    {r['pseudo']}", 130))
        if r.get("baseline"):
            lines.append(_wrap(f"    baseline:  {r['baseline']}", 130))
        lines.append("")
    ax.text(0.0, 1.0, "\n".join(lines) if rows else "(no items to show)", va="top", ha="left", family="monospace",
            fontsize=7.5, transform=ax.transAxes)
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    return fig
