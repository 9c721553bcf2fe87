"""The suite's GPU check: training and decoding throughput, fp16-vs-fp32 agreement, the targets, in one CSV.

Runs on a bare CUDA machine (torch, transformers, numpy, pandas, scipy, scikit-learn, PyYAML; no
FAISS, MLflow, papermill, DVC, nor the bundled MiniLM package; no network) in under 5 minutes on
an H100/H200, from a copy of the working tree. Writes ONE CSV (``--out``; default
``$OUT/gpu_check.csv`` when $OUT is set, else ``results/throughput/throughput_gpu.csv``, the file
the ``throughput`` stage merges into results/throughput/ and draws as the figure's GPU panel).

    python3 scripts/gpu_check.py                          # the GPU run (budget --budget-seconds 270)
    python3 scripts/gpu_check.py --device cpu --smoke     # tiny sizes on a CPU, well under a minute

Rows (column ``kind``; every row has the same columns, ``COLUMNS``):

- ``machine``: GPU name, torch/CUDA versions, memory, budget and total seconds, what the encoder is;
- ``train``: texts/s of the default CART model (params.yaml ``train:``: two-branch fusion, R-Drop
  consistency ω = ``train.consistency_weight``, frozen encoder states precomputed as the train stage
  does, through ``cartlib.train.train_step``) at batches 128 and 512, bf16 autocast on CUDA (fp32 on a
  CPU); ``train_projected_seconds``: 3 tasks × ``train.epochs`` × n_train_texts at ``train.batch_size``
  (n_train_texts from results/train/<task>/metrics.json when present, else estimated from params.yaml:
  the note says which);
- ``decode``: queries/s and peak memory (CUDA ``max_memory_allocated`` during the batch, the
  resident gallery and models included; the note gives the resident part) of ``cart_decode``
  (constrained beam search, the project's :class:`cartlib.decode.BeamDecoder`, from encoded
  queries, in fp16 on CUDA), ``unconstrained_decode`` (same, no
  constraint), ``cart_end_to_end`` (text in: tokenised ids through the query encoder + constrained
  search), ``dual_tower_exact`` (exact fp16 inner-product top-k from query vectors, chunked matmul +
  top-k, the fastest of three block sizes) and ``dual_tower_end_to_end`` (text in: encoder + mean
  pooling + the same search), at every gallery size × batch size, beam 10, top 10; column ``input``
  is ``encoded`` or ``text`` (tokenising is left out: ids are pre-tokenised). Skipped combinations
  are rows with an empty qps and the reason in ``note``;
- ``decode_compile``: ``cart_decode`` with the decoder step under ``torch.compile`` against eager,
  at one gallery (an option measured, not the default);
- ``agreement``: fp16 decoding on the GPU against fp32 decoding on the same machine's CPU, the same
  encoder states (fp32, as the evaluate stage feeds them), a trained-for-seconds model: share of
  queries with the identical top-1 and with the identical top-10 set;
- ``check``: host syncs per search (CUDA sync debug mode; 1 expected: the encoder-side packing
  decision, none in the level loop);
- ``target``: each target as value / target / passed, and findings (the dual-tower crossover).

What is not the suite's real setting, and why the numbers still hold: the query encoder is
all-MiniLM-L6-v2 built from its config (BERT, hidden 384, 6 layers, 12 heads) with RANDOM weights —
its speed depends on the shapes, not the weights; queries are random token ids of caption-like
lengths (12-32); galleries are sampled (on the device) from per-cluster Gaussians fitted to the task's
item features (``data/<task>/features/items.npy`` when present, else a real-shaped stand-in) and
identified by a CART identifier model (K-Means + RQ-VAE) fitted with params.yaml's ``identifiers:``;
decoders have params.yaml's ``train:`` config with random weights, except the agreement model,
trained for a few seconds on captions that name their item's identifier.

Budget: every phase checks the time left (``--budget-seconds``); a combination whose warm-up shows it
would not fit, or whose gallery is predicted to take too long to build, is skipped and recorded.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repository's cartlib, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cartlib.bench.measure import GPU_COLUMNS as COLUMNS, GPU_DECODE_SYSTEMS as DECODE_SYSTEMS  # noqa: E402
from cartlib.bench.measure import GPU_KINDS as KINDS  # noqa: E402,F401  (the CSV's row kinds)

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)
SMOKE_ENCODER = dict(MINILM, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
ENCODER_NOTE = ("query encoder: all-MiniLM-L6-v2 config (BERT 6x384, 12 heads) with random weights; "
                "speed depends on shapes, not weights")
TARGETS = {  # name -> (target, higher is better)
    "constrained_qps_b1024": 100_000.0,
    "constraint_overhead_ratio": 0.85,
    "flatness_ratio": 0.9,
    "train_texts_per_s_b512": 20_000.0,
    "top1_identical": 0.99,
    "top10_set_identical": 0.95,
}
TOKENS = (12, 32)  # caption-like query lengths in tokens, [CLS] and [SEP] included


# ---------------------------------------------------------------------------- arguments, budget, rows

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="the CSV (default: $OUT/gpu_check.csv, else "
                                                "results/throughput/throughput_gpu.csv under --root)")
    ap.add_argument("--root", default=str(ROOT), help="repository root (params.yaml, data/, results/train/)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and params.yaml's smoke overrides: checks the "
                                                         "script in well under a minute, even on a CPU")
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="total time to stay within (default 270 s; 120 s with --smoke)")
    ap.add_argument("--sizes", type=int, nargs="+", help="candidates per gallery (default 1K 100K 1M 10M)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", help="queries per batch (default 1 100 1024)")
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per combination (default 5; smoke 1)")
    ap.add_argument("--max-batch-seconds", type=float, default=None,
                    help="skip a combination whose warm-up batch is slower (default 5 s; smoke 20 s)")
    ap.add_argument("--train-batch-sizes", type=int, nargs="+", help="training batch sizes (default 128 512)")
    ap.add_argument("--train-steps", type=int, default=None, help="timed training steps per batch size (default 20)")
    ap.add_argument("--agreement-queries", type=int, default=None, help="default 512 (smoke 32)")
    ap.add_argument("--agreement-candidates", type=int, default=None,
                    help="gallery of the agreement check (default 100K; smoke: the largest size)")
    ap.add_argument("--agreement-train-seconds", type=float, default=None,
                    help="training of the agreement model (default 20 s; smoke: 5 steps)")
    ap.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                    help="decoding precision (default: fp16 on CUDA, fp32 on a CPU: cartlib.decode.default_precision)")
    ap.add_argument("--train-precision", default=None, choices=["fp32", "bf16"],
                    help="training autocast (default: bf16 on CUDA, fp32 on a CPU)")
    ap.add_argument("--agreement-precision", default=None, choices=["fp32", "fp16", "bf16"],
                    help="precision checked against fp32 on the CPU (default fp16)")
    ap.add_argument("--compile", default=None, choices=["off", "default", "reduce-overhead", "max-autotune", "eager"],
                    help="torch.compile mode of the decoder step measured against eager (default: reduce-overhead "
                         "on CUDA, off on a CPU; 'eager' = the eager backend, a cheap CPU check of the code path)")
    ap.add_argument("--task", default=None, help="task whose item features seed the galleries (params throughput.task)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=None, help="default: params.yaml base.seed")
    args = ap.parse_args(argv)
    smoke = args.smoke
    defaults = dict(budget_seconds=120.0 if smoke else 270.0, sizes=[100, 1000] if smoke else
                    [1_000, 100_000, 1_000_000, 10_000_000], batch_sizes=[1, 8] if smoke else [1, 100, 1024],
                    repeats=1 if smoke else 5, max_batch_seconds=20.0 if smoke else 5.0,
                    train_batch_sizes=[8, 32] if smoke else [128, 512], train_steps=3 if smoke else 20,
                    agreement_queries=32 if smoke else 512, agreement_train_seconds=0.0 if smoke else 20.0)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.agreement_candidates is None:
        args.agreement_candidates = max(args.sizes) if smoke else 100_000
    return args


def output_path(args: argparse.Namespace, root: Path) -> Path:
    """``--out``, else ``$OUT/gpu_check.csv`` when $OUT is set (the GPU machine's return folder), else
    the throughput stage's input ``results/throughput/throughput_gpu.csv``."""
    if args.out:
        return Path(args.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.csv"
    return root / "results" / "throughput" / "throughput_gpu.csv"


class Budget:
    """Seconds left of the run's budget."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.t0 = float(seconds), time.perf_counter()

    def spent(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.spent()


class Rows:
    """The CSV's rows (every column present in each)."""

    def __init__(self, device_label: str) -> None:
        self.rows: list[dict] = []
        self.device = device_label

    def add(self, kind: str, name: str, **fields) -> dict:
        row = {c: float("nan") for c in COLUMNS}
        row.update(kind=kind, name=name, system="", input="", precision="", device=self.device, unit="", passed="",
                   note="")
        row.update(fields)
        self.rows.append(row)
        return row

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(COLUMNS))


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- inputs

def load_params(root: Path, smoke: bool):
    """params.yaml of ``root`` (with its smoke overrides when ``smoke``), or the built-in defaults."""
    import yaml

    from cartlib.config import Params, params_from_dict

    path = root / "params.yaml"
    if not path.exists():
        return Params()
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if smoke:
        raw.setdefault("base", {})["scale"] = "smoke"
    return params_from_dict(raw, source=str(path))


def stand_in_features(n: int, *, dim: int = 384, clusters: int = 64, rank: int = 16, seed: int = 0) -> np.ndarray:
    """Real-shaped item features when the real ones are absent: unit vectors in ``clusters`` clusters
    of low intrinsic dimension (a random ``rank``-dimensional subspace each, plus small noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = rng.standard_normal((clusters, rank, dim)).astype(np.float32) / np.sqrt(dim)
    label = rng.integers(0, clusters, n)
    x = centres[label] + np.einsum("nr,nrd->nd", rng.standard_normal((n, rank)).astype(np.float32) * 0.35,
                                   bases[label])
    x += 0.02 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_tokens(n: int, *, seed: int, low: int = TOKENS[0],
                  high: int = TOKENS[1]) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random BERT inputs ([CLS] words [SEP], padded) with caption-like lengths in [low, high]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g)
    ids = torch.zeros(n, high, dtype=torch.long)
    mask = torch.arange(high)[None, :] < lengths[:, None]
    ids[mask] = torch.randint(1000, MINILM["vocab_size"], (int(mask.sum()),), generator=g)
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(n), lengths - 1] = 102  # [SEP]
    return ids, mask.long()


def caption_tokens(codes: torch.Tensor, level_sizes, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable stand-in captions of items with identifiers ``codes (n, L)``: random words of
    caption-like length with one word per identifier level naming that level's code (at a random
    position), so a model can learn to generate the identifier from the text."""
    codes = codes.cpu()
    n, depth = codes.shape
    ids, mask = random_tokens(n, seed=seed, low=max(TOKENS[0], depth + 2))
    g = torch.Generator().manual_seed(seed + 1)
    offsets = torch.tensor([0] + list(np.cumsum(level_sizes[:-1])), dtype=torch.long)
    words = 2000 + (offsets + codes) % (MINILM["vocab_size"] - 2000)  # (n, L) one word per level
    lengths = mask.sum(1)
    r = torch.rand(n, depth, generator=g).sort(1).values  # increasing: distinct positions, in level order
    pos = 1 + (r * (lengths[:, None] - 2 - depth)).long() + torch.arange(depth)
    ids.scatter_(1, pos, words)
    return ids, mask


class _Encoder:
    """``.encode(ids, mask)`` of a HF encoder (all S layers' states, as :meth:`CartModel.encode`), for
    :func:`cartlib.bench.queries.encode_bucketed` with an encoder other than the model's."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def encode(self, input_ids, attention_mask):
        from cartlib.model.cart import EncoderStates

        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return EncoderStates(torch.stack(tuple(out.hidden_states[1:]), 0), attention_mask.bool())

    def pooled(self, input_ids, attention_mask):
        """Mean-pooled, L2-normalised last layer (the dual tower's text side)."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask[..., None].to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- training

def n_train_texts(root: Path, params) -> tuple[int, str]:
    """Σ over the 3 tasks of the train stage's n_train_texts: from results/train/<task>/metrics.json
    when all are there, else estimated from params.yaml's data sizes (train.training_pairs' rule)."""
    tasks = tuple(params.base.tasks)
    found = {}
    for t in tasks:
        path = root / "results" / "train" / t / "metrics.json"
        if path.exists():
            try:
                found[t] = int(json.loads(path.read_text())["n_train_texts"])
            except (KeyError, ValueError):
                pass
    if len(found) == len(tasks):
        return sum(found.values()), f"n_train_texts from results/train/<task>/metrics.json ({found})"
    d, tr = params.data, params.train
    n_items = d.n_train if not tr.max_train_items else min(d.n_train, tr.max_train_items)
    refs = n_items * (tr.refs_per_item or d.n_captions)
    pseudo = (n_items + d.n_test + d.n_val) * d.n_pseudo if tr.caption_enhancement else 0
    return len(tasks) * (refs + pseudo), (f"n_train_texts estimated from params.yaml data sizes: {len(tasks)} tasks x "
                                          f"({refs} reference + {pseudo} pseudo-captions)")


def pick_device(name: str) -> torch.device:
    """``--device`` as a torch device, a GPU always with its index (``cuda:0``, as the train stage's
    ``model.device`` is): ``cartlib.train.EncodedTexts.batch`` compares the states' device with the one
    asked for, and a plain ``cuda`` against states already on ``cuda:0`` made it pin a GPU tensor
    (the first H200 run stopped there)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def train_loop(model, states, codes: torch.Tensor, *, batch: int, steps: int, cfg, precision: str, device,
               seed: int) -> tuple[float, float, list[float]]:
    """``steps`` optimiser steps of ``cartlib.train.train_step`` at ``batch`` after 2 warm-up steps,
    on precomputed encoder states, batches as the train stage draws them (length-bucketed). No host
    sync inside; returns (seconds of the timed steps, peak MB, last (loss, ce, kl))."""
    from cartlib.train import TrainBatch, length_bucketed_batches, train_step

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    order = []
    epoch = 0
    while len(order) < steps + 2:
        order += [b for b in length_bucketed_batches(states.lengths, batch, seed=seed + epoch) if len(b) == batch]
        epoch += 1
        if epoch > 1000:
            raise ValueError(f"fewer than {batch} training texts")
    codes_dev = codes.to(device)
    states = states.to_device_if_fits(device)  # as the train stage: on the GPU when they fit
    model.train()

    def step(idx):
        b = TrainBatch(None, None, codes_dev[idx.to(device)], states.batch(idx, device))
        return train_step(model, opt, sched, b, consistency_weight=cfg.consistency_weight, grad_clip=cfg.grad_clip,
                          precision=precision)

    for idx in order[:2]:
        step(idx)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for idx in order[2:steps + 2]:
        vals = step(idx)
    sync(device)
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    model.eval()
    return secs, peak, [float(v) for v in vals.cpu()]


# ---------------------------------------------------------------------------- agreement

def agreement(model, cpu_model, index, states_cpu, *, device, precision, beam: int, top_k: int,
              batch: int = 256) -> dict:
    """Top-k of ``precision`` decoding of ``model`` on ``device`` vs fp32 decoding of its CPU copy
    ``cpu_model``, on the same fp32 encoder states: shares of queries with the same top-1 and the same
    top-k set."""
    from cartlib.decode import BeamDecoder

    cpu_index = index.to("cpu")
    dec_ref = BeamDecoder(cpu_model, precision="fp32")
    dec = BeamDecoder(model, precision=precision)
    ref_items, items, diffs = [], [], []
    q = states_cpu.mask.shape[0]
    for lo in range(0, q, batch):
        sel = torch.arange(lo, min(q, lo + batch))
        st = states_cpu.select(sel)
        ref = dec_ref.search(st, cpu_index, beam=beam, top_k=top_k)
        dev_st = type(st)(st.layers.to(device), st.mask.to(device))
        out = dec.search(dev_st, index, beam=beam, top_k=top_k)
        ref_items.append(ref.items)
        items.append(out.items.cpu())
        diffs.append((out.scores.cpu()[:, 0] - ref.scores[:, 0]).abs())
    a, b = torch.cat(items), torch.cat(ref_items)
    top1 = float((a[:, 0] == b[:, 0]).float().mean())
    same_set = float((a.sort(1).values == b.sort(1).values).all(1).float().mean())
    return {"top1_identical": top1, "top10_set_identical": same_set, "n_queries": q,
            "max_abs_top1_score_diff": float(torch.cat(diffs).max())}


# ---------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_seconds)
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    from cartlib import io
    from cartlib.baselines import exact_topk
    from cartlib.bench import galleries
    from cartlib.bench.queries import encode_bucketed
    from cartlib.bench.timing import PeakMemory, device_name, time_interleaved
    from cartlib.decode import BeamDecoder, Precision, default_precision
    from cartlib.model.cart import CartModel, EncoderStates

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root).resolve()
    params = load_params(root, args.smoke)
    tcfg = params.train
    seed = params.base.seed if args.seed is None else args.seed
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    prec = Precision.of(args.precision) if args.precision else default_precision(device)
    agree_prec = Precision.of(args.agreement_precision or "fp16")
    train_prec = args.train_precision or ("bf16" if cuda else "fp32")
    compile_mode = args.compile or ("reduce-overhead" if cuda else "off")
    fdtype = prec.dtype  # gallery features, query vectors and the query encoder: the decoding precision
    out = output_path(args, root)
    label = device_name(device)
    rows = Rows(label)
    task = args.task or params.throughput.task
    log(f"gpu_check: device {label}, torch {torch.__version__}, decode {prec.value}, train {train_prec}, "
        f"sizes {args.sizes}, batches {args.batch_sizes}, budget {budget.seconds:.0f} s -> {out}")

    # -- the machine
    rows.add("machine", "device", note=label)
    rows.add("machine", "torch", note=torch.__version__)
    rows.add("machine", "cuda", note=str(torch.version.cuda) if cuda else "none")
    if cuda:
        props = torch.cuda.get_device_properties(device)
        rows.add("machine", "gpu_memory_gb", value=props.total_memory / 2**30, unit="GiB")
    rows.add("machine", "cpu_threads", value=torch.get_num_threads(), unit="threads")
    enc_cfg = SMOKE_ENCODER if args.smoke else MINILM
    rows.add("machine", "encoder", note=ENCODER_NOTE if not args.smoke else
             "smoke: a tiny random BERT (2 x 64) in place of the MiniLM config, to keep the check fast")
    rows.add("machine", "budget_seconds", value=budget.seconds, unit="s")

    # -- features, identifier model, gallery distribution
    t0 = time.perf_counter()
    feat_path = root / "data" / task / "features" / "items.npy"
    if feat_path.exists():
        items = np.load(feat_path).astype(np.float32)
        source = str(feat_path.relative_to(root))
    else:
        items = stand_in_features(300 if args.smoke else 6000, dim=enc_cfg["hidden_size"], seed=seed)
        source = "random real-shaped stand-in (no data/<task>/features/items.npy)"
    ids_cfg = params.identifiers
    if ids_cfg.n_clusters > len(items) // 4:
        import dataclasses

        ids_cfg = dataclasses.replace(ids_cfg, n_clusters=max(2, len(items) // 4))
    id_model = galleries.fit_identifier_model(items, ids_cfg, seed=seed)
    mixture = galleries.fit_feature_mixture(items, id_model.labels_)
    rows.add("machine", "features", note=f"{source}, {len(items):,} items; identifier model fitted in "
                                         f"{time.perf_counter() - t0:.1f} s")
    log(f"features: {source}; identifier model in {time.perf_counter() - t0:.1f} s")

    # -- the query encoder (random MiniLM) and the queries
    torch.manual_seed(seed)
    enc32 = BertModel(BertConfig(**enc_cfg)).eval().to(device)  # frozen fp32: training and agreement states
    enc16 = copy.deepcopy(enc32).to(fdtype).eval()  # the query encoder of the decode rows
    qenc = _Encoder(enc16)
    n_q = max(args.batch_sizes)
    q_ids, q_mask = random_tokens(n_q, seed=seed)
    q_ids, q_mask = q_ids.to(device), q_mask.to(device)
    q_vec = galleries.sample_features_torch(mixture, n_q, seed=seed + 7, device=device, dtype=fdtype)

    def tokens(b: int):
        t = int(q_mask[:b].sum(1).max())
        return q_ids[:b, :t], q_mask[:b, :t]

    with torch.inference_mode():
        states = {b: encode_bucketed(qenc, *tokens(b)) for b in args.batch_sizes}

    def new_model(level_sizes) -> CartModel:
        torch.manual_seed(seed)
        return CartModel(text_encoder=enc32, freeze_encoder=True, level_sizes=level_sizes, d_model=tcfg.d_model,
                         n_layers=tcfg.n_layers, n_heads=tcfg.n_heads, dropout=tcfg.dropout,
                         fusion=tcfg.fusion).to(device).eval()

    memory = PeakMemory(device)
    blocks = [2**28, 2**30, 2**32] if cuda else [2**26, 2**28]
    last_build = None  # (N, seconds) of the last gallery build
    compile_ctx = None
    sizes = sorted(set(args.sizes))
    compile_n = min(sizes, key=lambda n: (abs(math.log(n / 1_000_000)), -n))
    agree_n = args.agreement_candidates
    if agree_n not in sizes:
        sizes = sorted(sizes + [agree_n])
        measured_sizes = set(args.sizes)
    else:
        measured_sizes = set(sizes)
    reserve = {"train": 45.0 if not args.smoke else 5.0}  # kept for training + agreement until they have run

    def skip_all(n: int, why: str) -> None:
        for b in args.batch_sizes:
            for s in DECODE_SYSTEMS:
                rows.add("decode", s, system=s, input="text" if "end_to_end" in s else "encoded",
                         precision=prec.value,
                         n_candidates=n, batch_size=b, beam=args.beam, top_k=args.top_k, note=f"skipped: {why}")

    for n in sizes:
        left = budget.left() - sum(reserve.values())
        # predicted from the last build when that one was large enough for its fixed costs not to count
        pred = (last_build[1] * n / last_build[0] if last_build and (last_build[0] >= 100_000
                                                                     or n <= 10 * last_build[0]) else 0.0)
        if pred > 0.5 * left:
            why = f"gallery build predicted {pred:.0f} s > half the {left:.0f} s left"
            log(f"N={n:,}: {why}")
            if n in measured_sizes:
                skip_all(n, why)
            continue
        gallery = galleries.build_gallery_torch(mixture, id_model, n, seed=seed + n, device=device, dtype=fdtype)
        last_build = (n, gallery.build_seconds)
        index = gallery.index
        log(f"N={n:,}: level sizes {gallery.level_sizes}, built in {gallery.build_seconds:.1f} s "
            f"({budget.left():.0f} s left)")
        model = new_model(gallery.level_sizes)

        if n == agree_n:  # -- training rows, then the agreement model, on this gallery's identifiers
            reserve.pop("train", None)
            train_phase(args, rows, model=model, enc_model=model, gallery=gallery, root=root, params=params,
                        device=device, train_prec=train_prec, seed=seed, budget=budget)
            agreement_phase(args, rows, model=model, gallery=gallery, device=device, precision=agree_prec,
                            seed=seed)
        if n not in measured_sizes:
            del gallery, index, model
            continue

        dec = BeamDecoder(model, precision=prec)
        if n == compile_n:
            compile_ctx = (model, index)
        if budget.left() > 30:  # host syncs of one search (the index's dense and CSR paths differ with N)
            b = min(args.batch_sizes, key=lambda x: abs(x - 100))
            check_syncs(rows, dec, states[b], index, n=n, b=b, args=args, device=device, precision=prec)
        feats = gallery.features
        resident = f"; resident before the batch {torch.cuda.memory_allocated(device) / 2**20:,.0f} MB" if cuda else ""
        for b in sorted(args.batch_sizes):
            left = budget.left() - sum(reserve.values())
            ids_b, mask_b = tokens(b)
            fns = {
                "cart_decode": lambda b=b: dec.search(states[b], index, beam=args.beam, top_k=args.top_k),
                "unconstrained_decode": lambda b=b: dec.search(states[b], None, beam=args.beam, top_k=args.top_k),
                "cart_end_to_end": lambda ids=ids_b, m=mask_b: dec.search(encode_bucketed(qenc, ids, m), index,
                                                                         beam=args.beam, top_k=args.top_k),
            }
            best_block = {}

            def dual(q_fn, b=b):
                def run(block):
                    return exact_topk(q_fn(), feats, k=args.top_k, batch_size=b, block_bytes=block)
                return run

            dual_q = {"dual_tower_exact": lambda b=b: q_vec[:b],
                      "dual_tower_end_to_end": lambda ids=ids_b, m=mask_b: qenc.pooled(ids, m)}
            probes, skip = {}, {}
            with torch.inference_mode():
                for name, fn in fns.items():
                    if left < 5:
                        skip[name] = f"time budget ({left:.0f} s left)"
                        continue
                    probes[name] = timed(fn, device)
                for name, q_fn in dual_q.items():
                    if left < 5:
                        skip[name] = f"time budget ({left:.0f} s left)"
                        continue
                    run = dual(q_fn)
                    tried = {}
                    for block in blocks:  # the fastest block size: the dual tower is never slowed down
                        tried[block] = timed(lambda: run(block), device)
                        if tried[block] > args.max_batch_seconds:
                            break
                    best_block[name] = min(tried, key=tried.get)
                    probes[name] = tried[best_block[name]]
                    fns[name] = (lambda run=run, blk=best_block[name]: run(blk))
            total_probe = sum(probes.values())
            share = max(0.0, left - 20.0) / max(1, len(sizes) * len(args.batch_sizes))
            repeats = max(1, min(args.repeats, int(share / max(total_probe, 1e-6)) - 1))
            for name, p in probes.items():
                if p > args.max_batch_seconds:
                    skip[name] = f"warm-up batch took {p:.1f} s > max_batch_seconds={args.max_batch_seconds:g}"
                elif p * (repeats + 1) > max(0.0, left - 10.0):
                    skip[name] = f"time budget: {p * (repeats + 1):.1f} s needed, {left:.0f} s left"
            with torch.inference_mode():
                res = time_interleaved(fns, batch_size=b, repeats=repeats, max_batch_seconds=args.max_batch_seconds,
                                       device=device, memory=memory, skip=skip)
            for name in DECODE_SYSTEMS:
                t = res[name]
                cart = name.startswith(("cart", "uncon"))
                note = f"skipped: {t.skipped}" if t.skipped else (
                    f"median of {len(t.seconds)} after a warm-up{resident}" + (
                        f"; score block {best_block[name] / 2**20:.0f} MiB (fastest of {len(blocks)})"
                        if name in best_block else ""))
                rows.add("decode", name, system=name, input="text" if "end_to_end" in name else "encoded",
                         precision=prec.value, n_candidates=n, batch_size=b,
                         beam=args.beam, top_k=args.top_k, qps=t.qps, latency_ms_p50=t.latency_ms_p50,
                         peak_mem_mb=t.peak_mem_mb, recall_vs_exact=float("nan") if cart else 1.0, note=note)
            log(f"  batch {b:>5}: " + ", ".join(f"{k} {res[k].qps:,.0f} q/s" for k in DECODE_SYSTEMS
                                                if not res[k].skipped) + f" ({budget.left():.0f} s left)")
        del gallery, index, dec, feats, fns, res
        if cuda:
            torch.cuda.empty_cache()

    # -- torch.compile of the decoder step, against eager, at one gallery
    if compile_mode != "off" and compile_ctx is not None:
        compile_phase(args, rows, compile_ctx, states=states, device=device, precision=prec, mode=compile_mode,
                      n=compile_n, budget=budget)

    # -- the targets
    table = rows.frame()
    targets_phase(rows, table, args)
    rows.add("machine", "total_seconds", value=budget.spent(), unit="s")
    frame = rows.frame()
    out.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    import pandas as pd

    with pd.option_context("display.width", 220, "display.max_columns", 30, "display.max_colwidth", 60):
        dec_rows = frame[frame["kind"] == "decode"]
        if len(dec_rows):
            log(dec_rows.pivot_table(index=["system", "batch_size"], columns="n_candidates", values="qps").round(0)
                .to_string())
        log(frame[frame["kind"].isin(["train", "agreement", "check", "target", "decode_compile"])][
            ["kind", "name", "system", "n_candidates", "batch_size", "qps", "value", "unit", "target", "passed",
             "note"]].to_string(index=False))
    log(f"wrote {len(frame)} rows to {out} in {budget.spent():.0f} s")
    return 0


def check_syncs(rows: Rows, dec, encoded, index, *, n: int, b: int, args, device, precision) -> None:
    """Host syncs of one constrained search: ops that sync (seen at the dispatcher, any device) in
    the level loop (0 expected) and, on CUDA, the synchronising calls the sync debug mode reports
    for the whole search (1 expected: the packing decision before the loop)."""
    from cartlib.bench.timing import level_loop_syncs

    base = dict(system="cart_decode", input="encoded", precision=precision.value, n_candidates=n, batch_size=b,
                beam=args.beam, top_k=args.top_k)
    with torch.inference_mode():
        before, loop = level_loop_syncs(dec, encoded, index, beam=args.beam, top_k=args.top_k)
    rows.add("check", "host_syncs_in_level_loop", **base, value=len(loop), target=0, passed=not loop,
             unit="ops", note=f"sync ops in the level loop: {loop or 'none'}; before it: {before}")
    if device.type != "cuda":
        return
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            dec.search(encoded, index, beam=args.beam, top_k=args.top_k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    n_sync = sum("synchroniz" in str(w.message).lower() for w in caught)
    rows.add("check", "cuda_syncs_per_search", **base, value=n_sync, target=1, passed=n_sync <= 1, unit="syncs",
             note="torch.cuda.set_sync_debug_mode('warn') around one search; 1 expected (before the level loop)")


def train_phase(args, rows: Rows, *, model, enc_model, gallery, root: Path, params, device, train_prec: str,
                seed: int, budget: Budget) -> None:
    """Training rows: texts/s at each training batch size, the projected default run; then train the
    model further (for ``--agreement-train-seconds``) so the agreement check sees peaked scores."""
    from cartlib.train import EncodedTexts

    tcfg = params.train
    n = gallery.n_candidates
    pool = max(args.train_batch_sizes) * (4 if args.smoke else 64)
    g = torch.Generator().manual_seed(seed + 11)
    pick = torch.randint(0, n, (pool,), generator=g)
    model.__dict__["_trained_items"] = pick  # the agreement queries describe these items (other words)
    codes = gallery.codes[pick.to(gallery.codes.device)].cpu()
    ids, mask = caption_tokens(codes, gallery.level_sizes, seed=seed + 12)
    t0 = time.perf_counter()
    states = EncodedTexts.build(enc_model, ids, mask).to_device_if_fits(device)
    log(f"training: {pool:,} caption texts encoded once in {time.perf_counter() - t0:.1f} s "
        f"(frozen encoder, as the train stage)")
    fusion = "two-branch fusion" if tcfg.fusion else "last-layer (no fusion)"
    desc = (f"CART d_model {tcfg.d_model}, {tcfg.n_layers} layers, {fusion}, consistency weight "
            f"{tcfg.consistency_weight:g}, frozen encoder states precomputed, "
            f"{'bf16 autocast' if train_prec == 'bf16' else 'fp32'}, AdamW")
    speed = {}
    for b in sorted(args.train_batch_sizes):
        if budget.left() < 20:
            rows.add("train", "train_texts_per_s", system="cart_train", precision=train_prec, batch_size=b,
                     unit="texts/s", note=f"skipped: time budget ({budget.left():.0f} s left)")
            continue
        secs, peak, last = train_loop(model, states, codes, batch=b, steps=args.train_steps, cfg=tcfg,
                                      precision=train_prec, device=device, seed=seed)
        speed[b] = args.train_steps * b / secs
        rows.add("train", "train_texts_per_s", system="cart_train", precision=train_prec, batch_size=b,
                 value=speed[b], unit="texts/s", peak_mem_mb=peak,
                 latency_ms_p50=secs / args.train_steps * 1e3,
                 note=f"{desc}; {args.train_steps} steps after 2 warm-up, no host sync between steps")
        log(f"  train batch {b}: {speed[b]:,.0f} texts/s, {secs / args.train_steps * 1e3:.1f} ms/step, "
            f"loss {last[0]:.3f}")
    total, how = n_train_texts(root, params)
    b_run = min(speed, key=lambda b: abs(b - tcfg.batch_size)) if speed else None
    if b_run is not None:
        secs = tcfg.epochs * total / speed[b_run]
        rows.add("train", "train_projected_seconds", system="cart_train", precision=train_prec, batch_size=b_run,
                 value=secs, unit="s",
                 note=f"default run's training on this device: {tcfg.epochs} epochs x {total:,} texts at "
                      f"{speed[b_run]:,.0f} texts/s (batch {b_run}; train.batch_size={tcfg.batch_size}); {how}; "
                      f"excludes encoding the texts and validation")
    # the agreement model: more steps on the same learnable captions
    t0 = time.perf_counter()
    steps, last = 0, None
    b = max(args.train_batch_sizes)
    while True:
        chunk = 5 if args.smoke else 50
        _, _, last = train_loop(model, states, codes, batch=b, steps=chunk, cfg=tcfg, precision=train_prec,
                                device=device, seed=seed + 100 + steps)
        steps += chunk + 2
        if time.perf_counter() - t0 >= args.agreement_train_seconds or budget.left() < 60:
            break
    model.__dict__["_trained_note"] = (f"agreement model: {steps} steps at batch {b} on {pool:,} learnable captions "
                                       f"of the gallery ({time.perf_counter() - t0:.0f} s); last loss {last[0]:.3f}, "
                                       f"CE {last[1]:.3f}")
    log(f"  {model.__dict__['_trained_note']}")
    model.eval()


def agreement_phase(args, rows: Rows, *, model, gallery, device, precision, seed: int) -> None:
    """fp16 (``precision``) decoding on ``device`` against fp32 on the CPU, the same fp32 states."""
    from cartlib.bench.queries import encode_bucketed

    q = args.agreement_queries
    g = torch.Generator().manual_seed(seed + 21)
    trained = model.__dict__.get("_trained_items")
    pick = (trained[torch.randint(0, len(trained), (q,), generator=g)] if trained is not None
            else torch.randint(0, gallery.n_candidates, (q,), generator=g))
    codes = gallery.codes[pick.to(gallery.codes.device)].cpu()
    ids, mask = caption_tokens(codes, gallery.level_sizes, seed=seed + 22)  # other words than training's
    t0 = time.perf_counter()
    cpu_model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    with torch.inference_mode():
        states = encode_bucketed(cpu_model, ids, mask)  # fp32 on the CPU, as the evaluate stage encodes
        res = agreement(model, cpu_model, gallery.index, states, device=device, precision=precision, beam=args.beam,
                        top_k=args.top_k)
        from cartlib.decode import BeamDecoder

        hits = BeamDecoder(cpu_model).search(states, gallery.index.to("cpu"), beam=args.beam, top_k=1).items[:, 0]
    want = gallery.index.to("cpu").lookup(codes)
    r1 = float((hits == want).float().mean())
    where = f"{device.type} {precision.value}" if device.type == "cuda" else f"cpu {precision.value}"
    note = (f"{where} vs cpu fp32 decoding, same fp32 encoder states; {q} queries, N={gallery.n_candidates:,}, "
            f"beam {args.beam}; max |top-1 score diff| {res['max_abs_top1_score_diff']:.2e}; recall@1 of the fp32 "
            f"ranking {r1:.3f}; {model.__dict__.get('_trained_note', 'untrained model')}; "
            f"{time.perf_counter() - t0:.0f} s")
    base = dict(system="cart_decode", input="encoded", precision=precision.value, n_candidates=gallery.n_candidates,
                batch_size=min(256, q), beam=args.beam, top_k=args.top_k)
    for name in ("top1_identical", "top10_set_identical"):
        v = res[name]
        rows.add("agreement", name, **base, value=v, unit="share of queries", target=TARGETS[name],
                 passed=v >= TARGETS[name], note=note)
    rows.add("agreement", "max_abs_top1_score_diff", **base, value=res["max_abs_top1_score_diff"],
             unit="log-probability", note=f"{where} vs cpu fp32: largest difference of a top-1 score (0 = the same "
                                          f"arithmetic; scores are accumulated in float32)")
    log(f"agreement: top-1 {res['top1_identical']:.4f}, top-{args.top_k} set {res['top10_set_identical']:.4f} "
        f"({q} queries; fp32 recall@1 {r1:.3f})")


def compile_phase(args, rows: Rows, ctx, *, states, device, precision, mode: str, n: int, budget: Budget) -> None:
    """cart_decode with the decoder step under torch.compile vs eager, at batch 1 and the largest."""
    from cartlib.bench.timing import time_interleaved
    from cartlib.decode import BeamDecoder

    import torch._dynamo

    model, index = ctx
    opts = {"backend": "eager"} if mode == "eager" else {"mode": mode, "dynamic": False}
    for name in ("recompile_limit", "cache_size_limit"):  # one graph per level and batch size: over the default 8
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    for b in sorted({min(args.batch_sizes), max(args.batch_sizes)}, reverse=True):  # the headline batch first
        base = dict(system="cart_decode", input="encoded", precision=precision.value, n_candidates=n, batch_size=b,
                    beam=args.beam, top_k=args.top_k)
        if budget.left() < (90 if device.type == "cuda" else 10):
            rows.add("decode_compile", f"compile_{mode}", **base,
                     note=f"skipped: time budget ({budget.left():.0f} s left)")
            continue
        try:
            eager = BeamDecoder(model, precision=precision)
            comp = BeamDecoder(model, precision=precision, compile_step=opts)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _ in range(2):  # compiles every level's shapes (and records CUDA graphs)
                    comp.search(states[b], index, beam=args.beam, top_k=args.top_k)
            sync(device)
            compile_s = time.perf_counter() - t0
            same = torch.equal(comp.search(states[b], index, beam=args.beam, top_k=args.top_k).items,
                               eager.search(states[b], index, beam=args.beam, top_k=args.top_k).items)
            fns = {"eager": lambda: eager.search(states[b], index, beam=args.beam, top_k=args.top_k),
                   "compiled": lambda: comp.search(states[b], index, beam=args.beam, top_k=args.top_k)}
            with torch.inference_mode():
                res = time_interleaved(fns, batch_size=b, repeats=args.repeats,
                                       max_batch_seconds=args.max_batch_seconds, device=device)
            for name, t in res.items():
                rows.add("decode_compile", name if name == "eager" else f"compile_{mode}", **base, qps=t.qps,
                         latency_ms_p50=t.latency_ms_p50,
                         value=res["compiled"].qps / res["eager"].qps if name != "eager" else float("nan"),
                         unit="compiled/eager qps" if name != "eager" else "",
                         note=(f"torch.compile({opts}) of BeamDecoder.step; first two searches {compile_s:.1f} s; "
                               f"same top-k as eager: {same}") if name != "eager" else "eager BeamDecoder.step")
            log(f"compile ({mode}) batch {b}: eager {res['eager'].qps:,.0f} q/s, compiled {res['compiled'].qps:,.0f} "
                f"q/s (compile {compile_s:.1f} s)")
        except Exception as e:  # noqa: BLE001 (a compiler missing on a bare machine must not lose the other rows)
            rows.add("decode_compile", f"compile_{mode}", **base, note=f"failed: {type(e).__name__}: {str(e)[:200]}")
            log(f"compile ({mode}) batch {b} failed: {type(e).__name__}: {e}")


def targets_phase(rows: Rows, table, args) -> None:
    """The targets (value, target, passed) and findings, from the rows measured above."""
    from cartlib.bench.analysis import crossover

    dec = table[(table["kind"] == "decode") & (table["input"] == "encoded")]

    def qps(system: str, n: int, b: int) -> float:
        sel = dec[(dec["system"] == system) & (dec["n_candidates"] == n) & (dec["batch_size"] == b)]["qps"]
        return float(sel.iloc[0]) if len(sel) and not math.isnan(sel.iloc[0]) else float("nan")

    have = dec[dec["system"] == "cart_decode"].dropna(subset=["qps"])
    big_b = max(args.batch_sizes)
    ns = sorted(set(have.loc[have["batch_size"] == big_b, "n_candidates"]))

    def target(name: str, value: float, note: str, **kw) -> None:
        t = TARGETS[name]
        rows.add("target", name, value=value, target=t, passed="" if math.isnan(value) else bool(value >= t),
                 note=note, **kw)

    ns = [int(n) for n in ns]
    n_1m = min(ns, key=lambda n: (abs(math.log(n / 1e6)), -n)) if ns else float("nan")
    target("constrained_qps_b1024", qps("cart_decode", n_1m, big_b) if ns else float("nan"),
           f"cart_decode queries/s at batch {big_b}, beam {args.beam}, N={n_1m:,}" if ns else "not measured",
           system="cart_decode", batch_size=big_b, n_candidates=n_1m, unit="queries/s")
    if ns:
        lo_all = min(qps("cart_decode", n, big_b) for n in ns)
        rows.add("target", "constrained_qps_b1024_min_over_n", system="cart_decode", batch_size=big_b, value=lo_all,
                 target=TARGETS["constrained_qps_b1024"], passed=bool(lo_all >= TARGETS["constrained_qps_b1024"]),
                 unit="queries/s", note=f"the slowest of N in {[int(n) for n in ns]}")
    ratio = qps("cart_decode", n_1m, big_b) / qps("unconstrained_decode", n_1m, big_b) if ns else float("nan")
    target("constraint_overhead_ratio", ratio, f"cart_decode / unconstrained_decode queries/s at N={n_1m:,}, "
           f"batch {big_b}" if ns else "not measured", batch_size=big_b, n_candidates=n_1m, unit="ratio")
    flat = qps("cart_decode", ns[-1], big_b) / qps("cart_decode", ns[0], big_b) if len(ns) > 1 else float("nan")
    target("flatness_ratio", flat, f"cart_decode queries/s at N={ns[-1]:,} / at N={ns[0]:,}, batch {big_b}"
           if len(ns) > 1 else "needs two gallery sizes", batch_size=big_b, unit="ratio")
    tr = table[(table["kind"] == "train") & (table["name"] == "train_texts_per_s")].dropna(subset=["value"])
    b512 = tr.loc[tr["batch_size"] == 512, "value"]
    target("train_texts_per_s_b512", float(b512.iloc[0]) if len(b512) else float("nan"),
           "training texts/s at batch 512" if len(b512) else "batch 512 not measured", batch_size=512,
           unit="texts/s")
    for b in sorted(args.batch_sizes):
        c = crossover(dec, batch_size=b) if len(dec) else None
        rows.add("target", "dual_tower_crossover_n", system="cart_decode", batch_size=b,
                 value=float("nan") if c is None else c[0], unit="candidates",
                 note="finding: N where cart_decode overtakes dual_tower_exact (log-log interpolation)"
                 if c is not None else "finding: no crossover in the measured sizes")


if __name__ == "__main__":
    sys.exit(main())
