"""Figures: each function returns a matplotlib Figure and does no file I/O."""
from __future__ import annotations

import textwrap

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
