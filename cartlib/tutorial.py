"""Helpers of the teaching notebook `notebooks/00_tutorial.ipynb`: CART end to end on tiny data.

The notebook defines no function; everything it needs beyond the library's own API lives here:
a tiny in-memory dataset (one gallery, its captions split into training and test queries), the
item features (a media tower trained into the frozen MiniLM space, which is also the dual-tower
baseline), and a step-by-step trace of the constrained beam search. Training pairs, ranking and
the beam search are the stages' own (`cartlib.stages.train`, `cartlib.stages.evaluate`,
`cartlib.decode`); the figures are in `cartlib.viz`.

Setting (a teaching choice, not the pipeline's split): the gallery is all `n_items` items. Each
item's first reference captions (and, with caption enhancement, its pseudo-captions) are training
queries; its last `n_test_captions` reference captions are the test queries, never trained on.
Generative retrieval has to learn every gallery item's identifier, so both CART and the dual-tower
baseline see the same items and the same training captions.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from cartlib.baselines import exact_topk
from cartlib.data import schema, synthetic
from cartlib.decode import LevelState, constrained_beam_search
from cartlib.encoders import contrastive, media as media_towers
from cartlib.encoders.text import encode_sentences
from cartlib.ids.prefix import PrefixIndex
from cartlib.metrics import retrieval_metrics
from cartlib.model.cart import CartModel, EncoderStates
from cartlib.ranking import Ranking, decode_texts
from cartlib.stages.train import TrainingPairs, training_pairs as stage_training_pairs
from cartlib.viz import level_names

__all__ = [
    "TutorialData", "FeatureResult", "LevelTrace", "BeamTrace",
    "setup_notebook", "make_data", "as_dataset", "caption_table", "training_pairs", "item_features",
    "identifier_frame", "encode_queries", "trace_beam_search", "trace_frame", "trace_summary", "final_beams",
    "cart_rankings", "dual_tower_rankings", "fusion_alpha", "recall_table",
]


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


def as_dataset(data: TutorialData) -> schema.Dataset:
    """The tutorial's gallery as an in-memory :class:`~cartlib.data.schema.Dataset` holding only what
    may be trained on: every item in the train split, its training reference captions and its
    pseudo-captions (the test queries are left out, so no builder can train on them)."""
    items = pd.DataFrame({"item_id": data.item_ids, "split": "train", "media_index": np.arange(len(data.item_ids)),
                          "media_path": "", "attributes": "{}"})
    caps = []
    for item_id, refs, pseudo in zip(data.item_ids, data.captions, data.pseudo_captions):
        caps += [(f"{item_id}-c{j}", item_id, "reference", t) for j, t in enumerate(refs[:len(refs) - data.n_test_captions])]
        caps += [(f"{item_id}-p{j}", item_id, "pseudo", t) for j, t in enumerate(pseudo)]
    captions = pd.DataFrame(caps, columns=["caption_id", "item_id", "kind", "text"])
    return schema.Dataset(Path("."), {"task": data.task}, items, captions, data.media)


def training_pairs(data: TutorialData, *, caption_enhancement: bool, seed: int = 0) -> TrainingPairs:
    """Training reference captions → their item; with caption enhancement also every pseudo-caption.
    The `train` stage's builder (:func:`cartlib.stages.train.training_pairs`) on :func:`as_dataset`."""
    return stage_training_pairs(as_dataset(data), caption_enhancement=caption_enhancement, seed=seed)


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
def identifier_frame(codes: np.ndarray, *, labels: Sequence[str], rows: Sequence[int] | None = None) -> pd.DataFrame:
    """Identifier table (one column per level) with a label per item, for `rows` (default all)."""
    codes = np.asarray(codes)
    rows = np.arange(len(codes)) if rows is None else np.asarray(rows)
    frame = pd.DataFrame(codes[rows], columns=level_names(codes.shape[1] - 2), index=rows)
    frame["item"] = [labels[r] for r in rows]
    return frame


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
    """Constrained beam search for ONE query, keeping what each level saw: the suite's decoder
    (:func:`cartlib.decode.constrained_beam_search`) with its ``on_level`` hook, not a copy of it."""
    if encoded.mask.shape[0] != 1:
        raise ValueError(f"trace one query at a time; got a batch of {encoded.mask.shape[0]}")
    levels: list[LevelTrace] = []

    def keep(s: LevelState) -> None:
        allowed = s.allowed if s.allowed is not None else torch.ones_like(s.log_probs, dtype=torch.bool)
        levels.append(LevelTrace(s.level, *(x[0].cpu().numpy().copy() for x in (
            s.prefixes, s.prefix_scores, s.log_probs, allowed, s.parents, s.codes, s.scores))))

    out = constrained_beam_search(model.eval(), encoded, prefix_index, beam=beam, top_k=top_k, on_level=keep)
    return BeamTrace(tuple(levels), out.items[0].cpu().numpy(), out.scores[0].cpu().numpy(), out.codes[0].cpu().numpy())


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


def trace_summary(trace: BeamTrace) -> pd.DataFrame:
    """Per level: beams entering, and how many of their next codes the prefix index allows."""
    rows = []
    for t in trace.levels:
        live = np.isfinite(t.prefix_scores)
        rows.append({"level": t.level, "beams_in": len(t.prefix_scores), "valid_next": int(t.allowed[live].sum()),
                     "all_next": int(live.sum()) * t.log_probs.shape[1]})
    return pd.DataFrame(rows)


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
                  top_k: int = 10, batch_size: int = 128, max_length: int = 48) -> Ranking:
    """Constrained beam search for every query text, exactly as the `evaluate` stage ranks
    (:func:`cartlib.ranking.decode_texts`); items are gallery rows (-1 = none)."""
    top_k = min(top_k, beam, prefix_index.n_items)
    return decode_texts(model, tokenizer, list(texts), prefix_index, beam=beam, top_k=top_k, batch_size=batch_size,
                        max_length=max_length)


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


