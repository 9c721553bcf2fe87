"""Decoding queries/s of the `evaluate` stage's path vs the `throughput` stage's ``cart_decode``, in one run.

Both stages decode with the one beam search of :mod:`cartlib.decode`, but they reach it by
different calls:

- evaluate (:func:`cartlib.stages.evaluate.decode_texts`, under ``torch.inference_mode``): per batch of
  length-sorted queries, ``constrained_beam_search(model, enc, index, beam=beam, top_k=top_k)``, which
  looks the model's :class:`~cartlib.decode.BeamDecoder` up through :func:`~cartlib.decode.decoder_for`
  (a fingerprint of every parameter, the frozen MiniLM's included) and calls its ``search``;
- throughput (:func:`cartlib.bench.measure.measure_gallery`, system ``cart_decode``):
  ``dec.search(states[b], index, beam=cfg.beam, top_k=k)`` on the :class:`~cartlib.bench.measure.Decoder`
  built by :func:`~cartlib.bench.measure.random_decoder` (its own ``BeamDecoder`` instance).

Setup: the model of ``params.yaml``'s ``train`` section (d_model, n_layers, n_heads, fusion) with random
decoder weights (no training: speed does not depend on the weights) around the bundled MiniLM; a random
gallery of N identifiers with ``identifiers``' level sizes (K coarse, M RQ levels of ``codebook_size``)
plus the unique-token level as the identifiers stage builds it (:func:`cartlib.ids.schemes.unique_token`);
Q synthetic image captions (:mod:`cartlib.data.synthetic`) tokenised and encoded ONCE up front.

Group "same input": both calls on the very same encoder states (evaluate's layout: length-sorted batches
of B, each padded to its own longest, ``model.encode``); every timed call decodes the next of the Q/B
batches, both paths cycling through the same batches. Group "stage layouts" (for context): each call on
the states its own stage would feed it (throughput: ``encode_bucketed`` of B queries in drawn order,
padded to the batch's longest). Timed by :func:`cartlib.bench.timing.time_interleaved` (one warm-up
each, interleaved rounds, medians). Also checks that both paths return the same top-k items. Not a test.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_decode_paths.py [--threads 2] [--repeats 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cartlib.bench.measure import random_decoder
from cartlib.bench.queries import encode_bucketed
from cartlib.bench.timing import retain_freed_memory, time_interleaved
from cartlib.config import load_params
from cartlib.decode import constrained_beam_search
from cartlib.ids.prefix import PrefixIndex
from cartlib.ids.schemes import unique_token
from cartlib.model.cart import EncoderStates

ROOT = Path(__file__).resolve().parents[1]


def random_gallery(n: int, n_clusters: int, n_levels: int, codebook_size: int, *, seed: int):
    """``n`` random identifiers ``(k, v_1..v_M, u)`` and their level sizes, as the identifiers stage
    sizes them (semantic levels at least their configured size; u = collision counter, size max+1)."""
    rng = np.random.default_rng(seed)
    prefix = np.column_stack([rng.integers(0, n_clusters, n)] + [rng.integers(0, codebook_size, n)
                                                                  for _ in range(n_levels)]).astype(np.int64)
    u = unique_token(prefix)
    codes = np.column_stack([prefix, u])
    sizes = tuple(max(a, int(b) + 1) for a, b in zip((n_clusters,) + (codebook_size,) * n_levels, prefix.max(0)))
    return codes, sizes + (int(u.max()) + 1,)


def caption_texts(n: int, *, seed: int) -> list[str]:
    """``n`` synthetic image captions (one reference caption per drawn attribute set)."""
    from cartlib.data.synthetic import caption_item, sample_attributes

    rng = np.random.default_rng(seed)
    return [caption_item(task="image", attributes=sample_attributes(task="image", rng=rng), rng=rng, n=1)[0].text
            for _ in range(n)]


class Cycle:
    """A callable that decodes the next batch on every call (so every path sees the same batches)."""

    def __init__(self, fn, batches: list) -> None:
        self.fn, self.batches, self.i = fn, batches, 0

    def __call__(self):
        out = self.fn(self.batches[self.i % len(self.batches)])
        self.i += 1
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="model and level-size settings")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--candidates", type=int, default=1000, help="identifiers in the random gallery")
    ap.add_argument("--batch", type=int, default=100, help="queries per decoding batch")
    ap.add_argument("--beam", type=int, default=0, help="beams (0: evaluate.beam of params)")
    ap.add_argument("--queries", type=int, default=1000, help="caption-like queries, encoded once")
    ap.add_argument("--repeats", type=int, default=20, help="timed interleaved rounds per group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--same-input-only", action="store_true", help="skip the 'stage layouts' timing group")
    ap.add_argument("--no-retain-freed-memory", action="store_true",
                    help="skip the throughput stage's mallopt (retain_freed_memory); process-wide either way")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    params = load_params(args.params)
    tc, ic = params.train, params.identifiers
    beam = args.beam or params.evaluate.beam
    top_k = min(params.evaluate.top_k, beam)
    retained = False if args.no_retain_freed_memory else retain_freed_memory()

    # -- model: params.train's decoder, random weights, around the bundled MiniLM (the throughput
    #    stage's random_decoder; evaluate's load_bundle builds the same CartModel from the same config)
    from cartlib.encoders.text import load_text_encoder

    tokenizer, encoder = load_text_encoder()
    codes, sizes = random_gallery(args.candidates, ic.n_clusters, ic.n_levels, ic.codebook_size, seed=args.seed)
    dec = random_decoder(encoder.eval(), sizes, tc, seed=args.seed, device="cpu", dtype=torch.float32,
                         weights="random (params.train)")
    model = dec.model
    index = PrefixIndex.build(torch.from_numpy(codes), sizes)
    ev_beam = min(beam, index.n_items)  # decode_texts does this

    # -- queries, tokenised and encoded once
    texts = caption_texts(args.queries, seed=args.seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        # evaluate's layout: length-sorted batches, each padded to its own longest, model.encode
        order = np.argsort([len(t) for t in texts], kind="stable")
        ev_batches = []
        for lo in range(0, len(texts), args.batch):
            idx = order[lo:lo + args.batch]
            tok = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=tc.max_length,
                            return_tensors="pt")
            ev_batches.append((idx, model.encode(tok["input_ids"], tok["attention_mask"])))
        # throughput's layout: B queries in drawn order, encode_bucketed, padded to the batch's longest
        tok = tokenizer(texts, padding=True, truncation=True, max_length=tc.max_length, return_tensors="pt")
        tp_batches = []
        for lo in range(0, len(texts), args.batch):
            ids, mask = tok["input_ids"][lo:lo + args.batch], tok["attention_mask"][lo:lo + args.batch]
            t = max(int(mask.sum(1).max()), 1)  # QuerySet.batch
            tp_batches.append((np.arange(lo, lo + len(ids)), encode_bucketed(model, ids[:, :t], mask[:, :t])))
    enc_seconds = time.perf_counter() - t0

    def evaluate_call(enc: EncoderStates):  # decode_texts' call (the function runs under inference_mode)
        with torch.inference_mode():
            return constrained_beam_search(model, enc, index, beam=ev_beam, top_k=top_k)

    def throughput_call(enc: EncoderStates):  # measure_gallery's "cart_decode" lambda
        return dec.beam.search(enc, index, beam=beam, top_k=top_k)

    n_tok = [float(e.mask.sum(1).float().mean()) for _, e in ev_batches]
    pad = [float(e.mask.float().mean()) for _, e in ev_batches]
    pad_tp = [float(e.mask.float().mean()) for _, e in tp_batches]
    print(f"load average before the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu, fp32; mallopt retain_freed_memory: "
          f"{retained} (process-wide, both paths alike)")
    print(f"model: params.train d_model={tc.d_model} n_layers={tc.n_layers} n_heads={tc.n_heads} fusion={tc.fusion}, "
          f"RANDOM decoder weights (untrained; speed does not depend on the weights), bundled MiniLM encoder")
    print(f"gallery: {args.candidates:,} random identifiers, level sizes {sizes} "
          f"(K={ic.n_clusters}, {ic.n_levels} RQ levels of {ic.codebook_size}, unique-token level)")
    print(f"queries: {len(texts):,} synthetic image captions, {np.mean(n_tok):.1f} tokens mean, encoded once in "
          f"{enc_seconds:.1f} s; batch {args.batch}, beam {beam}, top-{top_k}; real-token share per batch "
          f"{min(pad):.2f}-{max(pad):.2f} (evaluate layout), {min(pad_tp):.2f}-{max(pad_tp):.2f} (throughput layout)")
    print("calls: evaluate = constrained_beam_search(model, enc, index, beam, top_k) -> decoder_for(model).search(...)")
    print("       throughput cart_decode = Decoder.beam.search(states, index, beam, top_k) (own BeamDecoder)")
    print("       not literally the same call: same BeamDecoder.search code, evaluate adds the decoder_for lookup")

    # -- top-k identity
    same_items = same_scores = 0
    max_diff = 0.0
    ev_items = np.full((len(texts), top_k), -1, np.int64)
    for idx, enc in ev_batches:
        a, b = evaluate_call(enc), throughput_call(enc)
        same_items += int((a.items == b.items).all(1).sum())
        same_scores += int((a.scores == b.scores).all(1).sum())
        max_diff = max(max_diff, float((a.scores - b.scores).abs().max()))
        ev_items[idx] = a.items.numpy()
    tp_items = np.full_like(ev_items, -1)
    for idx, enc in tp_batches:
        tp_items[idx] = throughput_call(enc).items.numpy()
    same_layouts = int((ev_items == tp_items).all(1).sum())
    print(f"top-{top_k} items, same input: identical for {same_items}/{len(texts)} queries "
          f"(scores bit-identical for {same_scores}/{len(texts)}, max |diff| {max_diff:.2e})")
    print(f"top-{top_k} items, each stage's layout: identical for {same_layouts}/{len(texts)} queries "
          f"(padding differs, so scores may differ in the last bits)")

    # -- timing: interleaved, one warm-up each, medians (cartlib.bench.timing)
    groups = {
        "same input": {"evaluate (constrained_beam_search)": Cycle(evaluate_call, [e for _, e in ev_batches]),
                       "throughput (cart_decode)": Cycle(throughput_call, [e for _, e in ev_batches])},
    }
    if not args.same_input_only:
        groups["stage layouts"] = {"evaluate (constrained_beam_search)": Cycle(evaluate_call,
                                                                              [e for _, e in ev_batches]),
                                   "throughput (cart_decode)": Cycle(throughput_call, [e for _, e in tp_batches])}
    print(f"\n{'group':<14} {'path':<36} {'queries/s':>10} {'p50 ms/batch':>13} {'min ms':>8} {'max ms':>8}")
    ratios = {}
    for group, fns in groups.items():
        res = time_interleaved(fns, batch_size=args.batch, repeats=args.repeats, max_batch_seconds=60.0, device="cpu")
        for name, t in res.items():
            print(f"{group:<14} {name:<36} {t.qps:10.1f} {t.latency_ms_p50:13.1f} {min(t.seconds) * 1e3:8.1f} "
                  f"{max(t.seconds) * 1e3:8.1f}")
        (ev, e), (tp, p) = res.items()
        per_round = statistics.median(a / b for a, b in zip(p.seconds, e.seconds))  # paired, same round
        ratios[group] = (e.qps / p.qps, per_round)
    print()
    for group, (r, paired) in ratios.items():
        print(f"ratio evaluate/throughput queries/s, {group}: {r:.3f} (median of paired per-round ratios "
              f"{paired:.3f}); target >= 0.8: {'met' if r >= 0.8 else 'NOT met'}")
    print(f"{args.repeats} interleaved rounds per group after one warm-up each; every call decodes one batch of "
          f"{args.batch}, cycling through the {len(ev_batches)} batches")
    print(f"load average after the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
