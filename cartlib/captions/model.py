"""A small learned captioner: item vector → caption words (ClipCap-style prefix, Mokady et al. 2021,
arXiv 2111.09734).

ClipCap maps a CLIP image embedding through an MLP to `prefix_length` vectors that are prepended to
a language model's input; the language model then continues the "prefix" with the caption. Here the
language model is a small causal transformer trained from scratch over the words of the train
captions (ClipCap fine-tunes GPT-2), so the output vocabulary is exactly the train captions' tokens.

The item vectors are the `features` stage's media-side vectors (the dual tower's item tower): the
captioner sees the media only through them, so its errors are tied to the dual tower's: what the
tower cannot tell apart, the captioner cannot say.

Training: teacher forcing, cross-entropy on the next word (PAD ignored), AdamW, seeded. Decoding is
batched over items (one Python step per generated token, never per item): `sample` draws
`n` captions per item at a temperature from a seeded generator; `beam` keeps the `n` best beams.
BOS, PAD and UNK are never generated, and EOS not as the first word (no empty captions).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from cartlib.captions.text import Vocabulary


class PrefixCaptioner(nn.Module):
    """[MLP(item vector) as `prefix_length` vectors ; word embeddings] → causal transformer → next word."""

    def __init__(self, *, in_dim: int, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
                 dropout: float, prefix_length: int, max_length: int):
        super().__init__()
        self.prefix_length, self.d_model, self.max_length = prefix_length, d_model, max_length
        hidden = max(d_model, d_model * prefix_length // 2)  # ClipCap's MLP: in → (d·P)/2 → d·P
        self.prefix = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, d_model * prefix_length))
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(prefix_length + max_length + 2, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=2 * d_model, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, vectors: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, D) vectors, (B, T) input tokens (BOS first) → (B, T, V) logits of the next word."""
        b, t = tokens.shape
        prefix = self.prefix(vectors).view(b, self.prefix_length, self.d_model)
        x = torch.cat([prefix, self.embed(tokens)], dim=1)
        x = x + self.position(torch.arange(x.shape[1], device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        h = self.blocks(x, mask=mask, is_causal=True)
        return self.out(self.norm(h[:, self.prefix_length:]))


class TrainedCaptioner(NamedTuple):
    model: PrefixCaptioner
    vocab: Vocabulary
    history: list[dict]  # per epoch: epoch, loss, val_loss (nan without validation), seconds


def build_captioner(*, in_dim: int, vocab: Vocabulary, cfg) -> PrefixCaptioner:
    """A captioner sized by a `CaptionsConfig` (or anything with its fields)."""
    return PrefixCaptioner(in_dim=in_dim, vocab_size=len(vocab), d_model=cfg.d_model, n_layers=cfg.n_layers,
                           n_heads=cfg.n_heads, dropout=cfg.dropout, prefix_length=cfg.prefix_length,
                           max_length=cfg.max_length)


def train_captioner(*, vectors: np.ndarray, texts: Sequence[str], cfg, seed: int,
                    val_vectors: np.ndarray | None = None, val_texts: Sequence[str] = (),
                    weight_decay: float = 0.01, device: str = "cpu", progress: bool = True) -> TrainedCaptioner:
    """Teacher-forced cross-entropy on (vector, caption) pairs; the vocabulary is these captions' words.

    `vectors[i]` is the item vector of `texts[i]` (one row per caption). The validation pairs are only
    scored (teacher-forced loss per epoch), never trained on; with them, the weights of the epoch with
    the lowest validation loss are restored at the end (early stopping chosen on validation items).
    """
    import time

    from tqdm.auto import tqdm

    if len(vectors) != len(texts) or not len(texts):
        raise ValueError(f"need one vector per caption and at least one caption, got {len(vectors)} and {len(texts)}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vocab = Vocabulary.from_captions(texts)
    model = build_captioner(in_dim=vectors.shape[1], vocab=vocab, cfg=cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    x = torch.as_tensor(np.asarray(vectors, np.float32))
    y = torch.as_tensor(vocab.encode(list(texts), max_length=cfg.max_length))
    has_val = val_vectors is not None and len(val_texts) > 0
    if has_val:
        vx = torch.as_tensor(np.asarray(val_vectors, np.float32))
        vy = torch.as_tensor(vocab.encode(list(val_texts), max_length=cfg.max_length))
    loss_fn = nn.CrossEntropyLoss(ignore_index=vocab.pad)
    history = []
    best_loss, best_state = math.inf, None
    n_batches = math.ceil(len(x) / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * n_batches, desc="captioner", unit="batch", disable=not progress)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.as_tensor(rng.permutation(len(x)))
        total, count = 0.0, 0
        for lo in range(0, len(x), cfg.batch_size):
            idx = order[lo:lo + cfg.batch_size]
            tokens = _trim(y[idx], vocab.pad).to(device)
            logits = model(x[idx].to(device), tokens[:, :-1])
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{total / count:.3f}")
        val_loss = teacher_forced_loss(model, vx, vy, pad=vocab.pad, device=device) if has_val else float("nan")
        history.append({"epoch": epoch, "loss": total / count, "val_loss": val_loss,
                        "seconds": time.perf_counter() - t0})
        if has_val and val_loss < best_loss:
            best_loss, best_state = val_loss, {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainedCaptioner(model, vocab, history)


@torch.no_grad()
def teacher_forced_loss(model: PrefixCaptioner, vectors: torch.Tensor, tokens: torch.Tensor, *, pad: int,
                        device: str = "cpu", batch_size: int = 512) -> float:
    """Mean next-word cross-entropy per token (no dropout)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(vectors), batch_size):
        t = _trim(tokens[lo:lo + batch_size], pad).to(device)
        logits = model(vectors[lo:lo + batch_size].to(device), t[:, :-1])
        target = t[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=pad, reduction="sum")
        total += float(loss)
        count += int((target != pad).sum())
    model.train(was)
    return total / max(count, 1)


def _trim(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """Drop trailing all-PAD columns (a batch of short captions costs only its longest)."""
    keep = int((tokens != pad).any(0).nonzero().max()) + 1
    return tokens[:, :keep]


# ---- decoding -------------------------------------------------------------------------------
def _banned(vocab: Vocabulary, device) -> torch.Tensor:
    ban = torch.zeros(len(vocab), dtype=torch.bool, device=device)
    ban[[vocab.pad, vocab.bos, vocab.unk]] = True
    return ban


@torch.no_grad()
def generate(trained: TrainedCaptioner, vectors: np.ndarray, *, n: int, decoding: str, temperature: float,
             max_length: int, seed: int, batch_size: int = 512, device: str = "cpu",
             progress: bool = False) -> list[list[str]]:
    """`n` captions for every row of `vectors` (items in chunks of `batch_size`)."""
    from tqdm.auto import tqdm

    if decoding not in ("sample", "beam"):
        raise ValueError(f"captions.decoding must be 'sample' or 'beam', got {decoding!r}")
    if decoding == "sample" and not temperature > 0:
        raise ValueError(f"captions.temperature must be > 0 for sampling, got {temperature!r}")
    model, vocab = trained.model.to(device).eval(), trained.vocab
    max_length = min(max_length, model.max_length)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.as_tensor(np.asarray(vectors, np.float32))
    out: list[list[str]] = []
    for lo in tqdm(range(0, len(x), batch_size), desc=f"decode ({decoding})", disable=not progress):
        chunk = x[lo:lo + batch_size].to(device)
        if decoding == "sample":
            ids = _sample(model, vocab, chunk, n=n, temperature=temperature, max_length=max_length, generator=g)
        else:
            ids = _beam(model, vocab, chunk, n=n, max_length=max_length)
        rows = ids.cpu().tolist()  # (B·n, T) item-major
        out.extend([vocab.decode(r) for r in rows[i * n:(i + 1) * n]] for i in range(len(chunk)))
    return out


def _sample(model, vocab, vectors, *, n, temperature, max_length, generator) -> torch.Tensor:
    rows = vectors.repeat_interleave(n, dim=0)
    tokens = torch.full((len(rows), 1), vocab.bos, dtype=torch.long, device=rows.device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
    ban = _banned(vocab, rows.device)
    for step in range(max_length):
        logits = model(rows, tokens)[:, -1] / temperature
        logits = logits.masked_fill(ban, -math.inf)
        if step == 0:
            logits[:, vocab.eos] = -math.inf
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, vocab.pad), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == vocab.eos
        if bool(done.all()):
            break
    return tokens[:, 1:]


def _beam(model, vocab, vectors, *, n, max_length) -> torch.Tensor:
    """The `n` best beams per item by total log-probability (finished beams keep their score)."""
    b, device = len(vectors), vectors.device
    rows = vectors.repeat_interleave(n, dim=0)
    tokens = torch.full((b * n, 1), vocab.bos, dtype=torch.long, device=device)
    # only the first beam of each item is live at the start, so the n beams differ
    scores = torch.full((b, n), -math.inf, device=device)
    scores[:, 0] = 0.0
    done = torch.zeros(b * n, dtype=torch.bool, device=device)
    ban = _banned(vocab, device)
    v = len(vocab)
    for step in range(max_length):
        logp = torch.log_softmax(model(rows, tokens)[:, -1].masked_fill(ban, -math.inf), -1)
        if step == 0:
            logp[:, vocab.eos] = -math.inf
        # a finished beam extends only by PAD, at no cost
        logp = torch.where(done[:, None], torch.full_like(logp, -math.inf), logp)
        logp[done, vocab.pad] = 0.0
        total = (scores.reshape(-1, 1) + logp).view(b, n * v)
        scores, flat = total.topk(n, dim=1)
        parent = (flat // v) + torch.arange(b, device=device)[:, None] * n
        word = (flat % v).reshape(-1)
        parent = parent.reshape(-1)
        tokens = torch.cat([tokens[parent], word[:, None]], dim=1)
        done = done[parent] | (word == vocab.eos)
        if bool(done.all()):
            break
    return tokens[:, 1:]  # beams come out of topk sorted best first


def nearest_rows(queries: np.ndarray, keys: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    """Row of `keys` with the highest dot product for each row of `queries` (unit vectors: cosine)."""
    q = torch.as_tensor(np.asarray(queries, np.float32))
    k = torch.as_tensor(np.asarray(keys, np.float32))
    return torch.cat([(q[lo:lo + batch_size] @ k.T).argmax(1) for lo in range(0, len(q), batch_size)]).numpy()
