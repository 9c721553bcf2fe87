"""Queries/s of every main-table system, like for like (issue 15, item 6).

The main table's queries/s used to compare unlike things: CART's (the `evaluate` stage's ranking
run) included tokenising and encoding the queries, the dual tower's and FAISS's (the `baselines`
stage) started from already-encoded queries and searched all of them as one batch. Here every
system runs on **the same batches** and is timed **with and without query encoding**:

- batches: the task's test queries sorted by text length (stable) and cut into batches of
  ``evaluate.batch_size`` (:func:`query_batches`), exactly the batches of the evaluate stage's
  ranking run (:func:`cartlib.ranking.decode_texts` uses this function);
- a pass runs every batch end to end, text in, ranked list (gallery rows + scores, top-k, host
  arrays) out, with a lap timer between the two parts:

  1. *encode*: tokenise the batch's texts and run the query encoder. CART: its MiniLM encoder, all
     S layers, as :meth:`~cartlib.model.cart.CartModel.encode` gives them to the decoder (the
     ranking run's tokeniser settings, ``train.max_length``); dual-tower systems: the bundled
     MiniLM, mean-pooled and L2-normalised, ``max_length`` 64 (:func:`sentence_encoder`, the maths
     of :func:`cartlib.encoders.text.encode_sentences`, which made the features' query vectors);
  2. *search* from the encoded batch: CART: :class:`cartlib.decode.BeamDecoder` constrained beam
     search (the decoder instance the ranking run used, :func:`cartlib.decode.decoder_for` at
     :func:`~cartlib.decode.default_precision` of the device; its encoder-side cross-attention
     keys/values are part of the search); dual tower exact: torch matmul + top-k
     (:func:`cartlib.baselines.exact_topk`, in the decoder's compute dtype); FAISS flat / IVF /
     HNSW: :func:`cartlib.baselines.faiss_indexes` with ``params.baselines`` (CPU FAISS);
     dual tower + pseudo-caption: the baselines stage's fused score
     ``w · s_dual + (1 − w) · s_pseudo`` and stable top-k (NumPy, on the host), each including
     moving the result (and, for the host systems, the query vectors) to the host.

  ``queries_per_second_with_encoding`` = queries / (encode + search) of a pass;
  ``queries_per_second_without_encoding`` = queries / search of the same pass: tokenising and the
  encoder forward (and the dual tower's pooling) are what it excludes. The dual-tower systems share
  one query encoder, so each batch is encoded once for them and each searches the result (their
  with-encoding time = that encoding + their own search). Both rates are medians over
  ``evaluate.speed_repeats`` passes after one warm-up batch; within a pass every system handles a
  batch before the next batch (interleaved: a load spike hits them alike); the device is
  synchronised around every timed part; FAISS and NumPy get torch's thread count
  (:func:`same_threads`).
- excluded from both, for every system: the item side (item features, FAISS indexes, pseudo-caption
  vectors, CART's prefix index), built once before timing, and mapping gallery rows to item ids.

Where the features' query vectors do not come from the bundled MiniLM (a real dataset's CLIP/CLAP
text tower, precomputed features) there is no encoder here for the dual-tower systems: they are
timed from the features' query vectors and their with-encoding rate is NaN (the ``query_encoder``
column says so). The pseudo-caption system is absent when no gallery item has a pseudo-caption.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from cartlib.baselines import SCORE_BLOCK_BYTES, exact_topk, faiss_indexes
from cartlib.bench.timing import sync
from cartlib.decode import Precision, decoder_for, default_precision
from cartlib.encoders.text import encode_sentences, mean_pool
from cartlib.ids.prefix import PrefixIndex
from cartlib.model.cart import CartModel
from cartlib.ranking import check_positive, query_batches  # noqa: F401  (the batches every system is timed on)
from cartlib.stages.baselines import pseudo_caption_scores, top_k_of

__all__ = ["SYSTEMS", "LABELS", "RATES", "SENTENCE_MAX_LENGTH", "QueryEncoder", "Ranked", "SpeedSystem",
           "PassTiming", "SpeedResult", "query_batches", "same_threads", "sentence_encoder", "cart_system", "dual_tower_systems",
           "measure", "main_table_speed", "caption"]

# the `system` column, in table order; the dual-tower names are the baselines stage's (systems.tsv)
SYSTEMS = ("cart", "dual_tower_exact", "faiss_flat", "faiss_ivf", "faiss_hnsw", "pseudo_caption_fused")
# label columns (speed.tsv, stable across reruns) and measurement columns (speed.timings.tsv; their
# names contain `per_second`, so cartlib.results.split_table routes them there)
LABELS = ("system", "description", "query_encoder", "batch_size", "n_queries", "n_candidates", "top_k", "repeats",
          "device")
RATES = ("queries_per_second_with_encoding", "queries_per_second_without_encoding")
SENTENCE_MAX_LENGTH = 64  # encode_sentences' default, with which the features stage encoded the queries

QueryEncoder = Callable[[list[str]], Tensor]  # a batch's texts -> (B, D) unit query vectors on the device


class Ranked(NamedTuple):
    """The top-k of every query, in query order."""

    items: np.ndarray  # (Q, k) int64 gallery rows, best first; -1 for a slot the system left empty
    scores: np.ndarray  # (Q, k) float32; -inf where items == -1


class SpeedSystem(NamedTuple):
    """One main-table system as a speed pass runs it: encode a batch, then search it."""

    name: str  # the `system` column
    description: str
    query_encoder: str  # what the encode part runs (or why there is none)
    device: str  # where the search runs ("cpu" for FAISS and NumPy, whatever the suite's device)
    search: Callable[[Any], tuple[np.ndarray, np.ndarray]]  # encoded batch -> (items, scores) host arrays (B, k)
    encode: Callable[[list[str]], Any] | None = None  # the batch's texts -> what `search` takes (shared: one lap)
    encoded: Callable[[np.ndarray], Any] | None = None  # query positions -> their pre-encoded input (no `encode`)


class PassTiming(NamedTuple):
    """One timed pass of one system over all batches."""

    encode_seconds: float  # sum over the batches of the encode part (NaN: no encoder)
    search_seconds: float  # sum over the batches of the search part


class SpeedResult(NamedTuple):
    table: pd.DataFrame  # one row per system: LABELS + RATES
    batches: tuple[np.ndarray, ...]  # query positions of each batch, the same for every system
    ranked: dict[str, Ranked]  # system -> its ranked lists from the last timed pass
    passes: dict[str, tuple[PassTiming, ...]]  # system -> its timed passes, in order


def sentence_encoder(tokenizer, model, *, device: str | torch.device,
                     max_length: int = SENTENCE_MAX_LENGTH) -> QueryEncoder:
    """The dual tower's query encoder on ``device``: tokenise, run ``model`` (the bundled MiniLM),
    mean-pool the last layer over real tokens, L2-normalise (the maths of
    :func:`cartlib.encoders.text.encode_sentences`, kept on the device for the search)."""
    model = model.to(device).eval()

    def encode(texts: list[str]) -> Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)

    return encode


def cart_system(*, model: CartModel, tokenizer, index: PrefixIndex, beam: int, top_k: int, max_length: int,
                precision: Precision | str | None = None) -> SpeedSystem:
    """CART as the evaluate stage ranks: the tokeniser call and ``model.encode`` of
    :func:`cartlib.ranking.decode_texts`, then the :class:`~cartlib.decode.BeamDecoder` that
    :func:`~cartlib.decode.constrained_beam_search` uses (``decoder_for(model, precision)``; None:
    ``default_precision`` of the model's device), ``beam`` capped at the gallery size as there."""
    if top_k > index.n_items:
        raise ValueError(f"top_k={top_k} exceeds the {index.n_items} items of the gallery")
    precision = Precision.of(default_precision(model.device) if precision is None else precision)
    decoder = decoder_for(model, precision)
    beam = min(beam, index.n_items)

    def encode(texts: list[str]):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(model.device)
        return model.encode(batch["input_ids"], batch["attention_mask"])

    def search(states) -> tuple[np.ndarray, np.ndarray]:
        out = decoder.search(states, index, beam=beam, top_k=top_k)
        return out.items.cpu().numpy(), out.scores.cpu().numpy()

    return SpeedSystem("cart", f"CART, constrained beam search (beam {beam}, top-{top_k}, {precision.value})",
                       f"CART's text encoder (all layers, max {max_length} tokens)", torch.device(model.device).type,
                       search, encode=encode)


def dual_tower_systems(*, items: np.ndarray, query_vectors: np.ndarray, top_k: int, baselines, seed: int,
                       device: str | torch.device, encoder: QueryEncoder | None = None,
                       encoder_label: str = "MiniLM, mean-pooled", features_text_model: str = "",
                       pseudo_vectors: np.ndarray | None = None,
                       pseudo_owner: np.ndarray | None = None,
                       pseudo_query_vectors: np.ndarray | None = None) -> list[SpeedSystem]:
    """The dual tower exact, FAISS flat / IVF / HNSW and dual tower + pseudo-caption systems over the
    test gallery's ``items (N, D)``, built as the baselines stage builds them (``baselines``: a
    :class:`~cartlib.config.BaselinesConfig`). ``encoder``: the features' query encoder, which must be
    the MiniLM that encoded ``pseudo_vectors`` (the built-in benchmark); None: no encoder, the systems
    start from ``query_vectors (Q, D)`` (the features' query vectors) and, for the pseudo-caption side,
    ``pseudo_query_vectors (Q, D_text)`` (MiniLM); ``features_text_model`` names what made
    ``query_vectors`` (for the ``query_encoder`` column). ``pseudo_vectors (P, D_text)``/``pseudo_owner (P,)``:
    the gallery items' pseudo-caption vectors and their gallery rows (None: no pseudo-caption system)."""
    device = torch.device(device)
    items = np.ascontiguousarray(items, dtype=np.float32)
    query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
    n = len(items)
    if top_k > n:
        raise ValueError(f"top_k={top_k} exceeds the {n} items of the gallery")
    if query_vectors.ndim != 2 or query_vectors.shape[1] != items.shape[1]:
        raise ValueError(f"query vectors {query_vectors.shape} and items {items.shape} differ in dimension")
    dtype = default_precision(device).dtype  # exact search in the decoder's compute dtype, as the throughput stage
    gallery = torch.from_numpy(items).to(device=device, dtype=dtype)
    block = SCORE_BLOCK_BYTES if device.type == "cpu" else 4 * SCORE_BLOCK_BYTES
    pre = torch.from_numpy(query_vectors).to(device)
    made = f"query vectors from {features_text_model}" if features_text_model else "pre-encoded query vectors"
    label = encoder_label if encoder is not None else f"none here ({made}): with-encoding not measured"

    def host(q: Tensor) -> np.ndarray:
        return np.ascontiguousarray(q.detach().float().cpu().numpy(), dtype=np.float32)

    def pre_encoded(pos: np.ndarray) -> Tensor:
        return pre[torch.from_numpy(pos).to(device)]

    def exact(q: Tensor) -> tuple[np.ndarray, np.ndarray]:
        top = exact_topk(q.to(dtype), gallery, k=top_k, batch_size=max(len(q), 1), block_bytes=block)
        return top.indices.cpu().numpy(), top.scores.float().cpu().numpy()

    out = [SpeedSystem("dual_tower_exact", "dual-tower, exact (torch matmul)", label, device.type, exact,
                       encode=encoder, encoded=None if encoder is not None else pre_encoded)]
    for name, index in faiss_indexes(items, baselines, seed).items():
        description = ("FAISS IndexFlatIP (exact)" if name == "faiss_flat" else
                       f"FAISS IVF (nlist {index.nlist}, nprobe {index.nprobe})" if name == "faiss_ivf" else
                       f"FAISS HNSW (M {baselines.hnsw_m}, efSearch {baselines.hnsw_ef_search})")

        def search(q: Tensor, index=index) -> tuple[np.ndarray, np.ndarray]:
            scores, found = index.search(host(q), top_k)
            return found, scores

        out.append(SpeedSystem(name, description, label, "cpu", search, encode=encoder,
                               encoded=None if encoder is not None else pre_encoded))
    if pseudo_vectors is not None and len(pseudo_vectors):
        if pseudo_owner is None or len(pseudo_owner) != len(pseudo_vectors):
            raise ValueError("pseudo_owner must give the gallery row of every pseudo-caption vector")
        pvec = np.ascontiguousarray(pseudo_vectors, dtype=np.float32)
        owner = np.asarray(pseudo_owner)
        w = baselines.fusion_weight

        def fused(q: Tensor | tuple[Tensor, Tensor]) -> tuple[np.ndarray, np.ndarray]:
            # the baselines stage's `fused`, on one batch: dual-tower part on the features' vectors,
            # pseudo-caption part on MiniLM vectors (one and the same for the built-in benchmark)
            dual, mini = (host(q), host(q)) if isinstance(q, Tensor) else (host(q[0]), host(q[1]))
            return top_k_of(w * (dual @ items.T) + (1 - w) * pseudo_caption_scores(mini, pvec, owner, n), top_k)

        fused_pre = None
        if encoder is None:
            if pseudo_query_vectors is None or len(pseudo_query_vectors) != len(query_vectors):
                raise ValueError("without a query encoder the pseudo-caption system needs pseudo_query_vectors "
                                 "(MiniLM vectors of the queries), one row per query")
            pq = torch.from_numpy(np.ascontiguousarray(pseudo_query_vectors, dtype=np.float32)).to(device)

            def fused_pre(pos: np.ndarray) -> tuple[Tensor, Tensor]:
                rows = torch.from_numpy(pos).to(device)
                return pre[rows], pq[rows]

        out.append(SpeedSystem("pseudo_caption_fused", f"dual-tower + pseudo-caption (w = {w})", label, "cpu", fused,
                               encode=encoder, encoded=fused_pre))
    return out


def measure(systems: Sequence[SpeedSystem], *, texts: Sequence[str], batch_size: int, repeats: int,
            device: str | torch.device, n_candidates: int, top_k: int,
            on_batch: Callable[[str, int, np.ndarray], None] | None = None, progress: bool = False,
            clock: Callable[[], float] = time.perf_counter) -> SpeedResult:
    """Time every system of ``systems`` on the batches of :func:`query_batches` (see the module
    docstring): one warm-up batch, then ``repeats`` passes over all batches, batch by batch, every
    system on each batch before the next (interleaved: a load spike hits them alike).

    Systems whose ``encode`` is the same object (the dual-tower ones: one MiniLM) share its lap: each
    batch is encoded once and each of them searches the result; a system's with-encoding time is
    that encoding time plus its own search time, batch by batch. ``on_batch(system, pass, positions)``
    is called before a system searches a batch (pass -1 = the warm-up; outside the timed parts);
    ``clock`` is injectable for tests."""
    from tqdm.auto import tqdm

    repeats = check_positive(repeats, "evaluate.speed_repeats (timed passes)")
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("no queries to time")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"empty query at position {empty[0]}")
    names = [s.name for s in systems]
    if not systems or len(set(names)) != len(names):
        raise ValueError(f"need systems with distinct names, got {names}")
    for s in systems:
        if s.encode is None and s.encoded is None:
            raise ValueError(f"system {s.name!r}: neither an encoder nor pre-encoded queries")
    batches = tuple(query_batches(texts, batch_size))
    device = torch.device(device)
    q = len(texts)
    groups: dict[int, list[SpeedSystem]] = {}  # one per encoder object (or per system without one), in order
    for s in systems:
        groups.setdefault(id(s.encode) if s.encode is not None else id(s), []).append(s)
    ranked = {s.name: Ranked(np.full((q, top_k), -1, np.int64), np.full((q, top_k), -np.inf, np.float32))
              for s in systems}

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        sync(device)
        t0 = clock()
        out = fn()
        sync(device)
        return out, clock() - t0

    def run_batch(pass_no: int, pos: np.ndarray, enc: dict[str, float], search: dict[str, float]) -> None:
        batch = [texts[i] for i in pos]  # picking the texts is the caller's part, not the encoder's
        for group in groups.values():
            encode = group[0].encode
            if encode is not None:
                x, lap = timed(lambda: encode(batch))
            for s in group:
                if on_batch is not None:
                    on_batch(s.name, pass_no, pos)
                if encode is None:
                    x = s.encoded(pos)  # already encoded: fetching it is not timed
                else:
                    enc[s.name] += lap
                (found, scores), secs = timed(lambda: s.search(x))
                search[s.name] += secs
                # store (untimed): an empty slot is -1 / -inf whichever way a system marks it (FAISS: -1, -FLT_MAX)
                found, scores = np.asarray(found, np.int64), np.asarray(scores, np.float32)
                gone = (found < 0) | ~np.isfinite(scores)
                width = found.shape[1]
                ranked[s.name].items[pos, :width] = np.where(gone, -1, found)
                ranked[s.name].scores[pos, :width] = np.where(gone, -np.inf, scores)

    passes: dict[str, list[PassTiming]] = {s.name: [] for s in systems}
    with torch.inference_mode():
        # warm-up (lazy allocations, caches, FAISS/BLAS thread pools): the first batch, untimed
        run_batch(-1, batches[0], dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0))
        with tqdm(total=repeats * len(batches), desc="speed passes", unit="batch", disable=not progress) as bar:
            for r in range(repeats):
                enc, search = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
                for pos in batches:
                    run_batch(r, pos, enc, search)
                    bar.update(1)
                for s in systems:
                    passes[s.name].append(PassTiming(enc[s.name] if s.encode is not None else float("nan"),
                                                     search[s.name]))

    rows = []
    for s in systems:
        timed_passes = passes[s.name]
        with_enc = (statistics.median(q / max(t.encode_seconds + t.search_seconds, 1e-12) for t in timed_passes)
                    if s.encode is not None else float("nan"))
        without = statistics.median(q / max(t.search_seconds, 1e-12) for t in timed_passes)
        rows.append({"system": s.name, "description": s.description, "query_encoder": s.query_encoder,
                     "batch_size": int(batch_size), "n_queries": q, "n_candidates": int(n_candidates),
                     "top_k": int(top_k), "repeats": repeats, "device": s.device,
                     "queries_per_second_with_encoding": round(with_enc, 1),
                     "queries_per_second_without_encoding": round(without, 1)})
    table = pd.DataFrame(rows, columns=list(LABELS + RATES))
    return SpeedResult(table, batches, ranked, {k: tuple(v) for k, v in passes.items()})


@contextlib.contextmanager
def same_threads(n: int) -> Iterator[None]:
    """FAISS (OpenMP) and NumPy's BLAS (the pseudo-caption fusion) with ``n`` threads, torch's count,
    so every system runs on the same cores; then as before. Why NumPy too: its OpenBLAS starts one
    thread per core of its own, and on a loaded machine those threads wait on each other (a 64 x 384
    by 384 x 200 product measured 35 ms with them, 0.09 ms with one)."""
    import faiss
    from threadpoolctl import threadpool_limits

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        faiss.omp_set_num_threads(before)


def main_table_speed(*, texts: Sequence[str], model: CartModel, tokenizer, index: PrefixIndex, evaluate,
                     max_length: int, items: np.ndarray, query_vectors: np.ndarray, baselines, seed: int,
                     device: str | torch.device, text_encoder: tuple[Any, Any] | None,
                     features_from_minilm: bool, features_text_model: str = "", pseudo_texts: Sequence[str] = (),
                     pseudo_owner: np.ndarray | None = None, precision: Precision | str | None = None,
                     on_batch: Callable[[str, int, np.ndarray], None] | None = None,
                     progress: bool = False) -> SpeedResult:
    """Every main-table system of one task, timed by :func:`measure` on ``evaluate``'s batches
    (``evaluate``: an :class:`~cartlib.config.EvaluateConfig`: beam, top_k, batch_size, speed_repeats).

    ``texts``: the test queries, in the order of ``query_vectors`` (the features' vectors of the same
    queries); ``items``: the test gallery's features, in ``index``'s gallery order. ``text_encoder``:
    ``(tokenizer, model)`` of the bundled MiniLM: the dual tower's query encoder when
    ``features_from_minilm`` (the features' query vectors are its own), and the pseudo-captions'
    encoder; it may be None only when neither is needed. ``pseudo_texts``/``pseudo_owner``: the gallery
    items' pseudo-captions and their gallery rows (empty: no pseudo-caption system);
    ``features_text_model``: the features' query encoder, named in the table. ``precision``:
    CART's decoder precision (None: ``default_precision`` of the model's device, as the ranking run)."""
    device = torch.device(device)
    pseudo_texts = [str(t) for t in pseudo_texts]
    if text_encoder is None and (features_from_minilm or pseudo_texts):
        raise ValueError("the bundled MiniLM (text_encoder) is needed to encode the dual tower's queries "
                         "and the pseudo-captions")
    encoder = pseudo = pseudo_q = None
    if text_encoder is not None:
        tok, minilm = text_encoder
        if features_from_minilm:
            if minilm.config.hidden_size != np.shape(items)[1]:
                raise ValueError(f"features of dimension {np.shape(items)[1]} cannot come from the MiniLM "
                                 f"({minilm.config.hidden_size}-d)")
            encoder = sentence_encoder(tok, minilm, device=device)
        if pseudo_texts:  # the item side of pseudo-caption matching: built before timing, as a FAISS index
            pseudo = encode_sentences(pseudo_texts, tokenizer=tok, model=minilm, device=str(device))
            if not features_from_minilm:  # the pseudo-caption side's pre-encoded queries (the baselines stage's)
                pseudo_q = encode_sentences(list(texts), tokenizer=tok, model=minilm, device=str(device))
    systems = [cart_system(model=model, tokenizer=tokenizer, index=index, beam=evaluate.beam, top_k=evaluate.top_k,
                           max_length=max_length, precision=precision)]
    systems += dual_tower_systems(items=items, query_vectors=query_vectors, top_k=evaluate.top_k, baselines=baselines,
                                  seed=seed, device=device, encoder=encoder,
                                  encoder_label=f"MiniLM, mean-pooled (max {SENTENCE_MAX_LENGTH} tokens)",
                                  features_text_model=features_text_model,
                                  pseudo_vectors=pseudo, pseudo_owner=pseudo_owner, pseudo_query_vectors=pseudo_q)
    with same_threads(torch.get_num_threads()):
        return measure(systems, texts=texts, batch_size=evaluate.batch_size, repeats=evaluate.speed_repeats,
                       device=device, n_candidates=len(items), top_k=evaluate.top_k, on_batch=on_batch,
                       progress=progress)


def caption(table: pd.DataFrame) -> str:
    """The speed table's caption (from its label columns only: the same text on every rerun)."""
    if not len(table):
        return "No speed measurement."
    first = table.iloc[0]
    devices = ", ".join(f"{d}: {', '.join(table.loc[table['device'] == d, 'system'])}"
                        for d in dict.fromkeys(table["device"]))
    text = (f"Queries/s of every system on the same batches: the task's {first['n_queries']:,} test queries, "
            f"sorted by length (the evaluate stage's order), in batches of {first['batch_size']}; top-{first['top_k']} "
            f"of {first['n_candidates']:,} test items; median of {first['repeats']} timed passes after one warm-up "
            f"batch, every system on a batch before the next. With encoding: a batch's texts to its ranked list on the "
            f"host (tokenise, encode: CART's encoder with all its layers, as the decoder reads them; for the dual-tower "
            f"systems the bundled MiniLM, mean-pooled and L2-normalised, one encoding of the batch that each of them "
            f"then searches; then search). Without encoding: the search "
            f"alone, from the encoded batch (CART: constrained beam search from the encoder states, the decoder's "
            f"cross-attention keys/values included; dual-tower systems: from the unit query vectors); it excludes "
            f"tokenising and the encoder forward. Item-side work (features, FAISS indexes, pseudo-caption vectors, "
            f"the prefix index) is built before timing. Search device: {devices}.")
    if not table["query_encoder"].str.startswith(("CART", "MiniLM")).all():
        text += (" Empty with-encoding cells: the features' query vectors do not come from the bundled MiniLM, so "
                 "those systems are timed from them only.")
    return text
