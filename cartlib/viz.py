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


def training_curve(history: pd.DataFrame, *, title: str, metric: str = "loss"):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history["epoch"], history[metric], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
