"""Training loop of the CART model (CART, Fang et al., ACL 2025): CE + R-Drop consistency.

Loss per batch (the paper's objective; the weighting ω is a parameter, UNKNOWN in the paper):

    L = CE + ω · KL_sym,   CE = mean over identifier tokens of −log p(c_l | c_<l, q),
    KL_sym = ½ [KL(P¹ ‖ P²) + KL(P² ‖ P¹)]  (per token, over the level's codes, then averaged)

where P¹, P² are the per-level distributions of two forward passes of the same batch with
different dropout masks (R-Drop, Liang et al., NeurIPS 2021; the two passes run as one pass over
the batch duplicated, and CE is the mean of both). ω = 0 runs one plain pass.

AdamW (no weight decay on biases, norms, embeddings and the fusion weights α), linear warm-up
then cosine decay to 0, gradient-norm clipping, tqdm bars, an atomic checkpoint after every epoch
(through :mod:`cartlib.io`, the only writer). ``resume=True`` continues from the last checkpoint
and, on the CPU with a fixed seed, ends with bit-identical weights to an uninterrupted run: the
shuffle of epoch e comes from a generator seeded with ``seed + e``, and the RNG states that drive
dropout are saved and restored. A checkpoint is keyed by everything that produced it
(:mod:`cartlib.cache_key`: settings, data and training code); one with another key is stale: it is
never loaded, a line says why, and training starts from scratch.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cartlib.cache_key import WeightsKey, weights_key
from cartlib.decode import constrained_beam_search
from cartlib.ids.prefix import PrefixIndex
from cartlib.ids.vocab import Vocabulary
from cartlib.io import torch_load, torch_save
from cartlib.model.cart import CartModel, EncoderStates

__all__ = ["ValidationSet", "TrainResult", "train_cart", "cart_loss", "LossParts", "CHECKPOINT_NAME", "EncodedTexts",
           "length_bucketed_batches", "model_signature"]

CHECKPOINT_NAME = "last.pt"
_FORMAT = "cartlib.train.cart/v2"  # v2: keyed by a cache_key.WeightsKey (v1 checkpoints are stale)


class ValidationSet(NamedTuple):
    """Held-out queries for recall@1 after every epoch (a hit: the top item is a relevant one)."""

    texts: Sequence[str]
    items: Tensor  # (Q_val,) the row of `codes` relevant to each text, or (Q_val, R) its relevant rows, -1 pads
    prefix_index: PrefixIndex  # built from `codes`
    codes: Tensor  # (N, L) identifier table of the gallery


class TrainResult(NamedTuple):
    model: CartModel
    history: list[dict[str, float]]  # one dict per epoch


class LossParts(NamedTuple):
    loss: Tensor  # CE + ω KL
    ce: Tensor
    kl: Tensor


def cart_loss(
    model: CartModel, input_ids: Tensor | None, attention_mask: Tensor | None, codes: Tensor, *,
    consistency_weight: float, encoded: EncoderStates | None = None,
) -> LossParts:
    """CE over the identifier tokens + ω · symmetric KL between two dropout passes (R-Drop).

    ``encoded``: the (frozen) encoder's states of the batch, computed beforehand; then
    ``input_ids``/``attention_mask`` are not used."""
    b = codes.shape[0]
    two = consistency_weight > 0
    if encoded is not None or model.freeze_encoder:  # a frozen encoder is deterministic: encode once, decode twice
        enc = encoded if encoded is not None else model.encode(input_ids, attention_mask)
        if two:
            enc = EncoderStates(enc.layers.repeat(1, 2, 1, 1), enc.mask.repeat(2, 1))
        logits = model.decode(enc, codes.repeat(2, 1) if two else codes).logits
    elif two:
        logits = model(input_ids.repeat(2, 1), attention_mask.repeat(2, 1), codes.repeat(2, 1)).logits
    else:
        logits = model(input_ids, attention_mask, codes).logits
    targets = codes.repeat(2, 1) if two else codes
    ce = torch.stack([F.cross_entropy(z, targets[:, l]) for l, z in enumerate(logits)]).mean()
    if not two:
        return LossParts(ce, ce, torch.zeros((), device=ce.device))
    kl = []
    for z in logits:
        lp1, lp2 = torch.log_softmax(z[:b], -1), torch.log_softmax(z[b:], -1)
        # KL(P1||P2) + KL(P2||P1) = Σ (p1 - p2)(log p1 - log p2)
        kl.append(((lp1.exp() - lp2.exp()) * (lp1 - lp2)).sum(-1).mean() / 2)
    kl_t = torch.stack(kl).mean()
    return LossParts(ce + consistency_weight * kl_t, ce, kl_t)


def train_cart(
    model: CartModel,
    *,
    tokenizer: Any,
    texts: Sequence[str],
    codes: Tensor,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    grad_clip: float = 1.0,
    consistency_weight: float = 0.0,
    seed: int = 0,
    max_length: int = 64,
    checkpoint_dir: Path | str | None = None,
    progress: bool = True,
    val: ValidationSet | tuple | None = None,
    val_beam: int = 10,
    val_batch_size: int = 128,
    resume: bool = False,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    key: WeightsKey | None = None,
) -> TrainResult:
    """Train ``model`` to generate identifier ``codes[i] (L,)`` from ``texts[i]`` (CART).

    ``codes (Q, L)``: the target identifier of every training text (caption enhancement = the
    pseudo-captions are simply more rows). ``val``: ``(texts, items, prefix_index, codes)`` for
    recall@1 by constrained beam search (beam ``val_beam``) after each epoch. ``checkpoint_dir``:
    where ``last.pt`` is written after every epoch. ``resume``: continue from it if it exists and was
    written under the same ``key``; a fresh start otherwise (a stale checkpoint is never loaded, a
    line says what differed, and the next save overwrites it). ``key``: what identifies this run's
    weights (:func:`cartlib.cache_key.run_key` in the stages, covering the whole TrainConfig); by
    default a key of this function's arguments, the model's architecture, the data and the
    training code. ``on_epoch_end(epoch, record)`` runs after the checkpoint is written.

    Seeds torch, numpy and python's ``random`` from ``seed`` (like HF ``set_seed``). A frozen
    encoder's weights are not stored in the checkpoint: resume with the same encoder.
    """
    codes = torch.as_tensor(codes).long().cpu()
    q = len(texts)
    if q == 0:
        raise ValueError("no training texts")
    if codes.dim() != 2 or codes.shape[0] != q:
        raise ValueError(f"codes must be (Q={q}, L), one identifier per text; got {tuple(codes.shape)}")
    if codes.shape[1] != model.depth:
        raise ValueError(f"codes have L={codes.shape[1]} levels, the model {model.depth}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    Vocabulary(level_sizes=model.level_sizes).check_codes(codes.numpy())  # codes inside the vocabulary
    if key is None:
        settings = {"train_cart": {
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "warmup_ratio": warmup_ratio, "grad_clip": grad_clip, "consistency_weight": consistency_weight,
            "seed": seed, "max_length": max_length, "val_beam": val_beam}, "model": model_signature(model)}
        key = weights_key(settings=settings, texts=texts, targets=codes, val=val)
    device = model.device
    ids, mask = _tokenize(tokenizer, texts, max_length)  # pretokenised once, (Q, T) on the CPU
    lengths = mask.sum(1)
    # a frozen encoder gives every text the same states in every epoch: compute them once
    states = EncodedTexts.build(model, ids, mask, progress=progress) if model.freeze_encoder else None
    if val is not None:
        val = ValidationSet(*val)
        val_ids, val_mask = _tokenize(tokenizer, val.texts, max_length)
        val_index = val.prefix_index.to(device)
        val_items = torch.as_tensor(val.items).long().reshape(len(val.texts), -1).to(device)  # (Q_val, R)
        val_beam = max(1, min(val_beam, val_index.n_items))

    steps_per_epoch = math.ceil(q / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total_steps, warmup_ratio))

    start_epoch, history = 0, []
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    restored = _restore(ckpt_path, model, optimizer, scheduler, key) if resume and ckpt_path.exists() else None
    if restored is not None:
        start_epoch, history = restored
    else:
        _seed_everything(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]

    from tqdm.auto import tqdm  # progress bars only; imported late to keep the module light

    epoch_bar = tqdm(range(start_epoch, epochs), desc="train CART", disable=not progress, initial=start_epoch, total=epochs)
    for epoch in epoch_bar:
        t0 = time.perf_counter()
        model.train()
        batches = length_bucketed_batches(lengths, batch_size, seed=seed + epoch)
        sums = torch.zeros(3, dtype=torch.float64)
        batch_bar = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
        for idx in batch_bar:
            width = int(lengths[idx].max())  # trim the batch to its longest text
            parts = cart_loss(
                model,
                ids[idx, :width].to(device),
                mask[idx, :width].to(device),
                codes[idx].to(device),
                consistency_weight=consistency_weight,
                encoded=None if states is None else states.batch(idx, device),
            )
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
            optimizer.step()
            scheduler.step()
            vals = torch.stack([p.detach().double().cpu() for p in parts])
            sums += vals * idx.numel()
            batch_bar.set_postfix(loss=f"{float(vals[0]):.4f}")
        batch_bar.close()
        mean = (sums / q).tolist()
        record = {
            "epoch": epoch + 1,
            "loss": mean[0],
            "ce": mean[1],
            "kl": mean[2],
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - t0,
        }
        if val is not None:
            record["val_recall_at_1"] = _recall_at_1(
                model, val_ids, val_mask, val_items, val_index, beam=val_beam, batch_size=val_batch_size
            )
        history.append(record)
        epoch_bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "val_recall_at_1") if k in record})
        if ckpt_path is not None:
            _save(ckpt_path, model, optimizer, scheduler, epoch + 1, history, key)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    epoch_bar.close()
    model.eval()
    return TrainResult(model=model, history=history)


class EncodedTexts(NamedTuple):
    """All S layers' states of every training text, stored once, unpadded, in half precision."""

    flat: Tensor  # (Σ T_i, S, D) float16, text i at rows offsets[i] : offsets[i] + lengths[i]
    offsets: Tensor  # (Q,)
    lengths: Tensor  # (Q,)

    @classmethod
    def build(cls, model: CartModel, ids: Tensor, mask: Tensor, *, batch_size: int = 256, progress: bool = False) -> "EncodedTexts":
        """Encode ``ids (Q, T)`` in length-sorted batches (little padding)."""
        from tqdm.auto import tqdm

        lengths = mask.sum(1)
        offsets = torch.cumsum(lengths, 0) - lengths
        flat = torch.empty(int(lengths.sum()), model.n_enc_layers, model.d_enc, dtype=torch.float16)
        order = torch.argsort(lengths, stable=True)
        with torch.no_grad():
            for lo in tqdm(range(0, len(order), batch_size), desc="encode texts", leave=False, disable=not progress):
                idx = order[lo : lo + batch_size]
                width = int(lengths[idx].max())
                enc = model.encode(ids[idx, :width].to(model.device), mask[idx, :width].to(model.device))
                layers = enc.layers.permute(1, 2, 0, 3)[enc.mask].to("cpu", torch.float16)  # (tokens, S, D), row-major by text
                rows = (offsets[idx, None] + torch.arange(width)).masked_select(mask[idx, :width].bool())
                flat[rows] = layers
        return cls(flat, offsets, lengths)

    def batch(self, idx: Tensor, device: torch.device | str) -> EncoderStates:
        """The states of texts ``idx`` padded to the longest: ``layers (S, B, T, D)`` float32."""
        width = int(self.lengths[idx].max())
        pos = torch.arange(width)
        valid = pos < self.lengths[idx, None]  # (B, T)
        rows = torch.where(valid, self.offsets[idx, None] + pos, 0)
        layers = self.flat[rows].to(device, torch.float32).permute(2, 0, 1, 3)  # (S, B, T, D)
        return EncoderStates(layers * valid.to(device)[None, :, :, None], valid.to(device))


def length_bucketed_batches(lengths: Tensor, batch_size: int, *, seed: int, window: int = 50) -> list[Tensor]:
    """Shuffled batches of texts of similar length (less padding): a random permutation is cut
    into windows of ``window`` batches, each sorted by length and split into batches, and the
    batches are shuffled. Deterministic in ``seed``; every text appears exactly once."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g)
    batches = []
    for lo in range(0, len(order), batch_size * window):
        chunk = order[lo : lo + batch_size * window]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


# ------------------------------------------------------------------------------------ helpers
def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def _param_groups(model: CartModel, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: not biases, norms, embeddings or the fusion mixing weights α."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or name.endswith(("alpha_logits", "tok_emb.weight", "pos_emb.weight")) or "embeddings" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR factor: linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to 0."""
    warm = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _recall_at_1(
    model: CartModel, ids: Tensor, mask: Tensor, items: Tensor, index: PrefixIndex, *, beam: int, batch_size: int
) -> float:
    model.eval()
    hits = 0
    with torch.no_grad():
        for lo in range(0, ids.shape[0], batch_size):
            m = mask[lo : lo + batch_size]
            width = int(m.sum(1).max())
            enc = model.encode(ids[lo : lo + batch_size, :width].to(model.device), m[:, :width].to(model.device))
            out = constrained_beam_search(model, enc, index, beam=beam, top_k=1)
            top = out.items[:, :1]  # (B, 1); -1 never matches a relevant row
            hits += int(((top == items[lo : lo + batch_size]) & (top >= 0)).any(1).sum())
    model.train()
    return hits / ids.shape[0]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_state(model: CartModel) -> dict[str, Tensor]:
    """The model's weights; a frozen encoder is left out (it never changes)."""
    state = model.state_dict()
    if model.freeze_encoder:
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    return state


def model_signature(model: CartModel) -> dict[str, Any]:
    """The architecture of ``model`` as plain values (the default key's view of the model; the
    stages key by their TrainConfig instead)."""
    enc = model.encoder.config
    return {
        "class": type(model).__qualname__, "level_sizes": list(model.level_sizes), "d_model": int(model.d_model),
        "n_layers": len(model.layers), "n_heads": int(model.n_heads), "dropout": float(model.emb_drop.p),
        "d_ff": int(model.layers[0].ff[0].out_features) if len(model.layers) else None,
        "fusion": str(model.fusion_mode.value), "freeze_encoder": bool(model.freeze_encoder),
        "encoder": {"type": str(getattr(enc, "model_type", "")), "layers": int(model.n_enc_layers),
                    "width": int(model.d_enc), "vocab_size": int(getattr(enc, "vocab_size", 0))},
    }


def _save(path: Path, model, optimizer, scheduler, epoch: int, history, key: WeightsKey) -> None:
    torch_save(
        {
            "format": _FORMAT,
            "epoch": epoch,
            "model": _model_state(model),
            "frozen_encoder": model.freeze_encoder,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "history": history,
            "key": key.as_dict(),
        },
        path,
    )


def _restore(path: Path, model, optimizer, scheduler, key: WeightsKey) -> tuple[int, list[dict[str, float]]] | None:
    """Load the checkpoint at ``path`` into the model, optimizer, scheduler and RNGs and return
    (epochs done, history); None, touching nothing, when it is stale (the reason is printed)."""
    try:
        ck = torch_load(path)
    except ValueError as e:  # truncated or foreign: as stale as a checkpoint gets
        reason = str(e)
    else:
        if not isinstance(ck, dict) or ck.get("format") != _FORMAT:
            reason = "not a checkpoint of this version of cartlib.train"
        else:
            reason = key.stale_reason(ck.get("key"))
    if reason is not None:
        print(f"train_cart: ignoring the stale checkpoint {path}: {reason}; training from scratch")
        return None
    # the key matched, so these can only fail on a corrupted file: raise, never train on half-loaded weights
    if ck["frozen_encoder"] != model.freeze_encoder:
        raise ValueError(f"{path}: checkpoint has freeze_encoder={ck['frozen_encoder']}, the model {model.freeze_encoder}")
    missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    missing = [k for k in missing if not (model.freeze_encoder and k.startswith("encoder."))]
    if missing or unexpected:
        raise ValueError(f"{path}: model weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    _set_rng_state(ck["rng"])
    return int(ck["epoch"]), list(ck["history"])
