"""Helpers of the teaching notebook `notebooks/00_tutorial.ipynb`: CART end to end on tiny data.

The notebook defines no function; everything it needs beyond the library's own API lives here:
a tiny in-memory dataset (one gallery, its captions split into training and test queries), the
item features (a media tower trained into the frozen MiniLM space, which is also the dual-tower
baseline), a step-by-step trace of the constrained beam search, and one figure per step of the
method. Every figure function returns a matplotlib Figure and writes no file.

Setting (a teaching choice, not the pipeline's split): the gallery is all `n_items` items. Each
item's first reference captions (and, with caption enhancement, its pseudo-captions) are training
queries; its last `n_test_captions` reference captions are the test queries, never trained on.
Generative retrieval has to learn every gallery item's identifier, so both CART and the dual-tower
baseline see the same items and the same training captions.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from cartlib import viz  # noqa: F401  (sets the headless backend before pyplot is imported)
from cartlib.baselines import exact_topk
from cartlib.data import synthetic
from cartlib.decode import GenerationOutput, constrained_beam_search
from cartlib.encoders import contrastive, media as media_towers
from cartlib.encoders.text import encode_sentences
from cartlib.ids.prefix import DEAD, PrefixIndex
from cartlib.metrics import retrieval_metrics
from cartlib.model.cart import CartModel, EncoderStates

import matplotlib.pyplot as plt  # noqa: E402  (after cartlib.viz chose the backend)

__all__ = [
    "TutorialData", "TrainingPairs", "FeatureResult", "LevelTrace", "BeamTrace",
    "setup_notebook", "make_data", "caption_table", "training_pairs", "item_features",
    "level_names", "identifier_frame", "tree_layout", "TreeLayout",
    "encode_queries", "trace_beam_search", "trace_frame", "final_beams", "cart_rankings", "dual_tower_rankings",
    "fusion_alpha", "recall_table",
    "plot_items", "plot_clusters", "plot_residuals", "plot_rqvae_levels", "plot_identifier_tree",
    "plot_training", "plot_beam_trace", "plot_fusion_alpha", "plot_recall",
]

_STATUS_COLOURS = {"kept": "tab:green", "cut by beam width": "lightgrey", "removed by prefix constraint": "tab:red"}


# ------------------------------------------------------------------------------------ setup
def setup_notebook(*, n_threads: int, seed: int) -> None:
    """Torch threads, seeds, offline hub; in IPython, show returned Figures as PNG (once each).

    `n_threads` ≤ 0 leaves torch's default. The figures are drawn on the headless Agg backend,
    so nothing is shown twice; the PNG formatter displays the Figure a cell returns.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: plain bars
    if n_threads > 0:
        torch.set_num_threads(n_threads)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    try:
        from IPython import get_ipython
    except ImportError:  # plain python: nothing to configure
        return
    if get_ipython() is not None:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")


# ------------------------------------------------------------------------------------- data
class TutorialData(NamedTuple):
    """One gallery of rendered items with their captions, and the query split of the tutorial."""

    task: str
    item_ids: list[str]
    media: np.ndarray  # (N, *media_shape)
    attributes: list[dict]
    descriptions: list[str]  # (N,) error-free plain description of each item (for labels)
    captions: list[list[str]]  # (N, n_captions) human-style reference captions
    pseudo_captions: list[list[str]]  # (N, n_pseudo) from the imperfect captioner
    n_test_captions: int  # the last this many reference captions of each item are test queries

    @property
    def test_texts(self) -> list[str]:
        return [c for caps in self.captions for c in caps[len(caps) - self.n_test_captions:]]

    @property
    def test_rows(self) -> np.ndarray:
        """(Q_test,) gallery row of the item each test query describes."""
        return np.repeat(np.arange(len(self.captions)), self.n_test_captions)


class TrainingPairs(NamedTuple):
    texts: list[str]  # training queries
    rows: np.ndarray  # (Q,) gallery row whose identifier each text targets
    kinds: np.ndarray  # (Q,) "reference" or "pseudo"


def make_data(*, task: str = "image", n_items: int, seed: int, n_captions: int = 5, n_pseudo: int = 2,
              n_test_captions: int = 2, captioner_error_rate: float = 0.3) -> TutorialData:
    """Render `n_items` items of `task` with `cartlib.data.synthetic.generate` (in memory)."""
    if not 1 <= n_test_captions < n_captions:
        raise ValueError(f"n_test_captions must be in 1..n_captions-1 = {n_captions - 1}, got {n_test_captions}")
    chunks = list(synthetic.generate(task=task, n_train=0, n_test=n_items, seed=seed, n_captions=n_captions,
                                     n_pseudo=n_pseudo, captioner_error_rate=captioner_error_rate,
                                     chunk_size=max(1, n_items)))
    attributes = [a for c in chunks for a in c.attributes]
    plain = np.random.default_rng(0)  # error rate 0: the rng is never consulted for errors
    descriptions = [synthetic.pseudo_caption_item(task=task, attributes=a, rng=plain, n=1, error_rate=0.0)[0].text
                    for a in attributes]
    return TutorialData(
        task=task,
        item_ids=[i for c in chunks for i in c.item_ids],
        media=np.concatenate([c.media for c in chunks]),
        attributes=attributes,
        descriptions=descriptions,
        captions=[caps for c in chunks for caps in c.captions],
        pseudo_captions=[caps for c in chunks for caps in c.pseudo_captions],
        n_test_captions=n_test_captions,
    )


def training_pairs(data: TutorialData, *, caption_enhancement: bool) -> TrainingPairs:
    """Training reference captions → their item; with caption enhancement also every pseudo-caption."""
    texts, rows, kinds = [], [], []
    for row, caps in enumerate(data.captions):
        for text in caps[:len(caps) - data.n_test_captions]:
            texts.append(text), rows.append(row), kinds.append("reference")
    if caption_enhancement:
        for row, caps in enumerate(data.pseudo_captions):
            for text in caps:
                texts.append(text), rows.append(row), kinds.append("pseudo")
    return TrainingPairs(texts, np.asarray(rows, dtype=np.int64), np.asarray(kinds))


def caption_table(data: TutorialData, *, rows: Sequence[int]) -> pd.DataFrame:
    """Every caption of the items `rows`, with its kind and its use (train or test query)."""
    out = []
    for row in rows:
        caps = data.captions[row]
        for j, text in enumerate(caps):
            use = "test query" if j >= len(caps) - data.n_test_captions else "train query"
            out.append((data.item_ids[row], "reference", use, text))
        for text in data.pseudo_captions[row]:
            out.append((data.item_ids[row], "pseudo", "train query (caption enhancement)", text))
    return pd.DataFrame(out, columns=["item_id", "kind", "used as", "text"])


# --------------------------------------------------------------------------------- features
class FeatureResult(NamedTuple):
    """Item and query vectors in the frozen MiniLM space (also the dual-tower baseline)."""

    items: np.ndarray  # (N, D) unit vectors from the media tower
    test_queries: np.ndarray  # (Q_test, D) MiniLM vectors of the test queries
    history: pd.DataFrame  # per-epoch InfoNCE loss of the tower


def item_features(data: TutorialData, *, tokenizer, text_model, epochs: int, seed: int, batch_size: int = 64,
                  lr: float = 2e-3, weight_decay: float = 1e-4, temperature: float = 0.05,
                  width: int = 32, n_mels: int = 64) -> FeatureResult:
    """Train the media tower (symmetric InfoNCE) on the training reference captions, embed the gallery.

    Reuses `cartlib.encoders.contrastive.train_tower` / `embed_media`, as the `features` stage does.
    """
    n_train = len(data.captions[0]) - data.n_test_captions
    train_caps = [c for caps in data.captions for c in caps[:n_train]]
    vecs = encode_sentences(train_caps + data.test_texts, tokenizer=tokenizer, model=text_model)
    train_vecs = vecs[:len(train_caps)].reshape(len(data.captions), n_train, -1)  # (N, C, D)
    torch.manual_seed(seed)
    tower = media_towers.build_tower(data.task, out_dim=vecs.shape[1], width=width, n_mels=n_mels,
                                     media_shape=tuple(data.media.shape[1:]))
    trained = contrastive.train_tower(tower, media=data.media, text=train_vecs, epochs=epochs, batch_size=batch_size,
                                      lr=lr, weight_decay=weight_decay, temperature=temperature, seed=seed)
    items = contrastive.embed_media(trained.model, data.media)
    return FeatureResult(items, vecs[len(train_caps):], pd.DataFrame(trained.history))


# ------------------------------------------------------------------------------ identifiers
def level_names(n_levels: int) -> list[str]:
    """Names of CART's identifier levels `(k, v1..vM, u)` for M = `n_levels` RQ-VAE levels."""
    return ["k", *(f"v{m}" for m in range(1, n_levels + 1)), "u"]


def identifier_frame(codes: np.ndarray, *, labels: Sequence[str], rows: Sequence[int] | None = None) -> pd.DataFrame:
    """Identifier table (one column per level) with a label per item, for `rows` (default all)."""
    codes = np.asarray(codes)
    rows = np.arange(len(codes)) if rows is None else np.asarray(rows)
    frame = pd.DataFrame(codes[rows], columns=level_names(codes.shape[1] - 2), index=rows)
    frame["item"] = [labels[r] for r in rows]
    return frame


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


# ------------------------------------------------------------------------------ beam search
class LevelTrace(NamedTuple):
    """One level of the constrained beam search for one query (what `constrained_beam_search` does)."""

    level: int
    prefixes: np.ndarray  # (W, level) codes of the beams entering this level
    prefix_scores: np.ndarray  # (W,) their log-probabilities (-inf = a dead beam)
    log_probs: np.ndarray  # (W, K) log p(code | prefix, query), before the prefix constraint
    allowed: np.ndarray  # (W, K) bool: the prefix index's valid next codes
    parents: np.ndarray  # (W',) beam each kept candidate extends, best first
    codes: np.ndarray  # (W',) the code it appends
    scores: np.ndarray  # (W',) new log-probabilities


class BeamTrace(NamedTuple):
    levels: tuple[LevelTrace, ...]
    items: np.ndarray  # (top_k,) gallery rows, best first (-1 = no valid identifier)
    scores: np.ndarray  # (top_k,)
    codes: np.ndarray  # (top_k, L)


def encode_queries(model: CartModel, tokenizer, texts: Sequence[str], *, max_length: int = 48) -> EncoderStates:
    """Tokenise and encode query texts with the model's (frozen) encoder: all S layers kept."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        return model.encode(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))


def trace_beam_search(model: CartModel, *, encoded: EncoderStates, prefix_index: PrefixIndex, beam: int,
                      top_k: int) -> BeamTrace:
    """Constrained beam search for ONE query, level by level, keeping what each step saw.

    The same computation as `cartlib.decode.constrained_beam_search` (`model.memory` once, then per
    level `model.step`, `PrefixIndex.allowed`, a top-`beam` over beams × codes, `PrefixIndex.advance`),
    written out for a single query so every intermediate can be shown.
    """
    if encoded.mask.shape[0] != 1:
        raise ValueError(f"trace one query at a time; got a batch of {encoded.mask.shape[0]}")
    if not 1 <= top_k <= beam:
        raise ValueError(f"need 1 <= top_k <= beam, got top_k={top_k}, beam={beam}")
    model.eval()
    levels = []
    with torch.inference_mode():
        memory = model.memory(encoded)
        scores = torch.zeros(1, 1)  # (1, W)
        codes = torch.zeros(1, 1, 0, dtype=torch.long)  # (1, W, l)
        states = prefix_index.root(1)[:, None]  # (1, W) prefix-tree nodes
        cache, prev = None, None
        for level in range(model.depth):
            k = model.level_sizes[level]
            step = model.step(memory, cache, prev, level)
            logp = torch.log_softmax(step.logits.float(), -1)  # (1, W, K)
            w = logp.shape[1]
            allowed = prefix_index.allowed(states.reshape(-1), level).view(1, w, k)
            cand = (scores[:, :, None] + logp.masked_fill(~allowed, -math.inf)).view(1, w * k)
            new_scores, flat = cand.topk(min(beam, w * k), dim=1)
            parent = torch.div(flat, k, rounding_mode="floor")
            code = flat - parent * k
            levels.append(LevelTrace(level, codes[0].numpy().copy(), scores[0].numpy().copy(), logp[0].numpy().copy(),
                                     allowed[0].numpy().copy(), parent[0].numpy().copy(), code[0].numpy().copy(),
                                     new_scores[0].numpy().copy()))
            codes = torch.cat((codes.gather(1, parent[:, :, None].expand(-1, -1, level)), code[:, :, None]), 2)
            states = prefix_index.advance(states.gather(1, parent).reshape(-1), level, code.reshape(-1)).view(1, -1)
            scores = new_scores
            if level + 1 < model.depth:
                cache = step.cache.reorder(parent.reshape(-1))
                prev = code
        scores, codes = scores[:, :top_k], codes[:, :top_k]
        alive = scores > -math.inf
        items = prefix_index.item_index(states[:, :top_k].masked_fill(~alive, DEAD))
        codes = codes.masked_fill(~alive[:, :, None], DEAD)
    return BeamTrace(tuple(levels), items[0].numpy(), scores[0].numpy(), codes[0].numpy())


def trace_frame(trace: BeamTrace, *, top: int = 10, level: int | None = None) -> pd.DataFrame:
    """The `top` candidates (beam prefix + next code) of each level (or of `level`), best first by
    the model's score without the constraint.

    status: "kept" (a beam of the next level), "cut by beam width" (valid, not in the top `beam`),
    "removed by prefix constraint" (no gallery identifier continues that way; the model liked it
    anyway). score = log p(prefix, code | query); `p` = exp(score).
    """
    frames = []
    for t in trace.levels if level is None else (trace.levels[level],):
        kept = set(zip(t.parents.tolist(), t.codes.tolist()))
        total = t.prefix_scores[:, None] + t.log_probs  # (W, K) scores without the constraint
        rows = []
        for w, c in zip(*np.nonzero(np.isfinite(total))):
            status = ("removed by prefix constraint" if not t.allowed[w, c] else
                      "kept" if (w, c) in kept else "cut by beam width")
            rows.append({"level": t.level, "beam": int(w), "prefix": tuple(int(x) for x in t.prefixes[w]),
                         "code": int(c), "log_p_code": float(t.log_probs[w, c]), "score": float(total[w, c]),
                         "status": status})
        frame = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").head(top)
        frames.append(frame.assign(p=np.exp(frame["score"])))
    return pd.concat(frames, ignore_index=True)


def final_beams(trace: BeamTrace, *, labels: Sequence[str], gold: int | None = None) -> pd.DataFrame:
    """The ranked list the trace returns: identifier, score, item label (and whether it is `gold`)."""
    frame = pd.DataFrame({
        "identifier": [tuple(int(x) for x in c) for c in trace.codes],
        "score": trace.scores, "p": np.exp(trace.scores),
        "item": [labels[i] if i >= 0 else "(none)" for i in trace.items.tolist()],
    }, index=pd.RangeIndex(1, len(trace.items) + 1, name="rank"))
    if gold is not None:
        frame["correct"] = trace.items == gold
    return frame


def cart_rankings(model: CartModel, tokenizer, texts: Sequence[str], *, prefix_index: PrefixIndex, beam: int,
                  top_k: int = 10, batch_size: int = 128, max_length: int = 48) -> GenerationOutput:
    """Constrained beam search for every query text (in batches); items are gallery rows."""
    top_k = min(top_k, beam, prefix_index.n_items)
    parts = [constrained_beam_search(model, encode_queries(model, tokenizer, texts[lo:lo + batch_size],
                                                           max_length=max_length),
                                     prefix_index, beam=beam, top_k=top_k)
             for lo in range(0, len(texts), batch_size)]
    return GenerationOutput(*(torch.cat(x) for x in zip(*parts)))


def dual_tower_rankings(features: FeatureResult, *, top_k: int = 10) -> np.ndarray:
    """(Q_test, top_k) gallery rows ranked by cosine similarity (the dual-tower baseline)."""
    return exact_topk(features.test_queries, features.items, k=top_k).indices


def recall_table(rankings: dict[str, np.ndarray], *, gold: np.ndarray) -> pd.DataFrame:
    """Recall@1/5/10 and MRR@10 (`cartlib.metrics.retrieval_metrics`) of each method's ranked rows."""
    out = {}
    for name, ranked in rankings.items():
        ranked = np.asarray(ranked)
        if ranked.shape[1] < 10:  # fewer than 10 candidates: pad with empty slots
            ranked = np.pad(ranked, ((0, 0), (0, 10 - ranked.shape[1])), constant_values=-1)
        out[name] = retrieval_metrics(ranked, gold)
    return pd.DataFrame(out).T


def fusion_alpha(model: CartModel) -> np.ndarray | None:
    """Fine-branch mixing weights α of every decoder layer, (n_layers, S, D); None without fusion."""
    alphas = [layer.fusion.fine.alpha().detach().cpu().numpy() for layer in model.layers
              if layer.fusion.fine is not None]
    return np.stack(alphas) if alphas else None


# ---------------------------------------------------------------------------------- figures
def plot_items(data: TutorialData, *, n: int = 4):
    """Step 1: rendered items with a reference caption and a pseudo-caption (`cartlib.viz`)."""
    fig = viz.media_samples(data.task, data.media[:n], [c[0] for c in data.captions[:n]],
                            [p[0] for p in data.pseudo_captions[:n]], n=n)
    fig.suptitle(f"{data.task}: rendered items with a reference caption and a pseudo-caption", fontsize=9,
                 y=1.04)  # above the captions
    return fig


def _pca(x: np.ndarray):
    """A 2-component PCA fitted on `x` (N, D)."""
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=0).fit(x)


def plot_clusters(features: np.ndarray, *, labels: np.ndarray, centers: np.ndarray):
    """Step 2: item features in 2-D (PCA) coloured by K-Means cluster, centroids as crosses."""
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
    """Step 3: the residuals x − centroid_k: all clusters move to the origin, and they are small."""
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
    """Step 4: items per code at every RQ-VAE level, and the error left after each level.

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
    """Step 5: the prefix tree (identifier tree) of the items in a few clusters.

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
    """Step 6: CART's training loss (CE + ω·KL) and its two parts per epoch."""
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


def plot_beam_trace(trace: BeamTrace, *, top: int = 10, names: Sequence[str] | None = None):
    """Step 7: at each level the best candidates (beam prefix → next code) by the model's score.

    Green: kept as a beam; grey: valid but outside the beam width; red: removed by the prefix
    constraint (no gallery identifier continues that way). Bar length: the candidate's
    probability p(prefix, code | query) = exp(score).
    """
    depth = len(trace.levels)
    names = list(names) if names is not None else [f"level {l}" for l in range(depth)]
    fig, axes = plt.subplots(1, depth, figsize=(3.4 * depth, 0.9 + 0.3 * top), squeeze=False)
    for l, ax in enumerate(axes[0]):
        frame = trace_frame(trace, level=l, top=top)
        t = trace.levels[l]
        labels = ["·".join(map(str, p)) + f" → {c}" if p else f"→ {c}" for p, c in zip(frame["prefix"], frame["code"])]
        ax.barh(np.arange(len(frame)), np.exp(frame["score"]), color=[_STATUS_COLOURS[s] for s in frame["status"]])
        ax.set_yticks(np.arange(len(frame)), labels, fontsize=7)
        ax.invert_yaxis()
        n_valid = int(t.allowed[np.isfinite(t.prefix_scores)].sum())
        n_all = int(np.isfinite(t.prefix_scores).sum()) * t.log_probs.shape[1]
        ax.set_title(f"{names[l]}: {len(t.prefix_scores)} beam(s) in\n{n_valid} of {n_all} next codes valid",
                     fontsize=8)
        ax.set_xlabel("p(prefix → code | query)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _STATUS_COLOURS.values()]
    fig.legend(handles, list(_STATUS_COLOURS), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_fusion_alpha(model: CartModel):
    """Step 8: the fine-branch weights α (each decoder layer's mix of the S encoder layers).

    Left: α averaged over the feature dimensions (rows: decoder layers; columns: encoder layers;
    uniform = 1/S). Right: for each decoder layer, the share of feature dimensions whose largest
    weight is on each encoder layer.
    """
    alpha = fusion_alpha(model)
    if alpha is None:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"fusion mode {model.fusion_mode.value}: no fine branch, no α", ha="center", va="center")
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
    """Step 9: Recall@1/5/10 and MRR@10 of each method (rows of `recall_table`)."""
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
