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
from cartlib.decode import constrained_beam_search, default_precision
from cartlib.distributed import (all_reduce_grads, all_reduce_sum, backend_for, broadcast_parameters,
                                 gather_objects, launch, rank_info, shard, share_weight, worker_device)
from cartlib.ids.prefix import PrefixIndex
from cartlib.ids.vocab import Vocabulary
from cartlib.io import torch_load, torch_save
from cartlib.model.cart import CartModel, EncoderStates

__all__ = ["ValidationSet", "TrainResult", "train_cart", "train_step", "TrainBatch", "autocast", "PRECISIONS",
           "resolve_precision",
           "cart_loss", "LossParts", "CHECKPOINT_NAME", "EncodedTexts", "length_bucketed_batches", "model_signature"]

CHECKPOINT_NAME = "last.pt"
_FORMAT = "cartlib.train.cart/v2"  # v2: keyed by a cache_key.WeightsKey (v1 checkpoints are stale)


class ValidationSet(NamedTuple):
    """Held-out queries for recall@1 after every epoch (a hit: the top item is a relevant one)."""

    texts: Sequence[str]
    items: Tensor  # (Q_val,) the row of `codes` relevant to each text, or (Q_val, R) its relevant rows, -1 pads
    prefix_index: PrefixIndex  # built from `codes`
    codes: Tensor  # (N, L) identifier table of the gallery


class TrainResult(NamedTuple):
    model: CartModel  # with the best validation epoch's weights when there was a validation set
    history: list[dict[str, float]]  # one dict per epoch trained
    best_epoch: int | None = None  # the epoch whose weights the model holds (None: no validation, the last)


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
    precision: str = "fp32",
    nproc: int = 1,
    stop_after: int | None = None,
    patience: int = 0,
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
    training code. ``on_epoch_end(epoch, record)`` runs after the checkpoint is written (with
    ``nproc > 1``: in this process, for each epoch's record, after the workers finish).

    ``precision``: ``fp32``, or ``bf16`` (autocast of the forward pass to bfloat16; weights,
    gradients and optimizer state stay fp32). ``nproc``: data-parallel worker processes
    (:mod:`cartlib.distributed`): each takes its share of every global batch of ``batch_size``,
    gradients are summed, rank 0 writes the checkpoint; this process waits and returns the
    result. Inside an existing process group (torchrun) the group's ranks are the workers.
    ``stop_after``: train at most that many more epochs in this call, leaving a resumable
    checkpoint (a time-boxed session; the schedule stays the one of ``epochs``).

    With ``val``, the weights of the epoch with the best validation recall@1 are restored at the
    end (the first such epoch on ties; ``TrainResult.best_epoch``), and ``patience`` > 0 stops
    early once that many epochs in a row have not improved on it: ``epochs`` is then the most
    epochs trained, and the learning-rate schedule (warm-up + cosine) is laid over all of them, so
    a run stopped early never reached the end of its decay.

    Seeds torch, numpy and python's ``random`` from ``seed`` (rank r > 0 draws its dropout from
    ``seed + r``). A frozen encoder's weights are not stored in the checkpoint: resume with the
    same encoder.
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
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 or None, got {stop_after}")
    if patience < 0:
        raise ValueError(f"patience must be >= 0 (0 = never stop early), got {patience}")
    Vocabulary(level_sizes=model.level_sizes).check_codes(codes.numpy())  # codes inside the vocabulary
    in_group = rank_info().world > 1
    if in_group and rank_info().world != nproc:
        raise ValueError(f"running in a process group of {rank_info().world} ranks but nproc={nproc}")
    if key is None:
        settings = {"train_cart": {
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "warmup_ratio": warmup_ratio, "grad_clip": grad_clip, "consistency_weight": consistency_weight,
            "seed": seed, "max_length": max_length, "val_beam": val_beam, "precision": precision, "nproc": nproc,
            "patience": patience},
            "model": model_signature(model)}
        key = weights_key(settings=settings, texts=texts, targets=codes, val=val)
    schedule = _Schedule(epochs, batch_size, lr, weight_decay, warmup_ratio, grad_clip, consistency_weight, seed,
                         val_beam, val_batch_size, precision, patience)
    if nproc > 1 and not in_group:
        return _train_in_workers(model, tokenizer, texts, codes, max_length, val, schedule, key=key,
                                 checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                                 on_epoch_end=on_epoch_end, stop_after=stop_after, nproc=nproc)
    if in_group:  # a torchrun launch: every rank built its own model; start from rank 0's
        broadcast_parameters(model)
    data = _prepare(model, tokenizer, texts, codes, max_length, val, progress=progress and rank_info().is_main)
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    history, best_epoch = _fit(model, data, schedule, key=key, ckpt_path=ckpt_path, resume=resume,
                               progress=progress, on_epoch_end=on_epoch_end, stop_after=stop_after)
    return TrainResult(model=model, history=history, best_epoch=best_epoch)


PRECISIONS = ("fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``train.precision`` → what runs: ``auto`` is bf16 autocast on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
    return precision


class _Schedule(NamedTuple):
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    consistency_weight: float
    seed: int
    val_beam: int
    val_batch_size: int
    precision: str
    patience: int


class _Prepared(NamedTuple):
    """Everything the epochs read, computed once (and shipped to the workers with ``nproc > 1``)."""

    ids: Tensor  # (Q, T) token ids, CPU
    mask: Tensor  # (Q, T)
    codes: Tensor  # (Q, L) targets
    states: "EncodedTexts | None"  # a frozen encoder's states of every text, computed once
    val: ValidationSet | None
    val_ids: Tensor | None
    val_mask: Tensor | None


def _prepare(model: CartModel, tokenizer: Any, texts: Sequence[str], codes: Tensor, max_length: int,
             val: ValidationSet | tuple | None, *, progress: bool) -> _Prepared:
    ids, mask = _tokenize(tokenizer, texts, max_length)  # pretokenised once, (Q, T) on the CPU
    # a frozen encoder gives every text the same states in every epoch: compute them once
    states = EncodedTexts.build(model, ids, mask, progress=progress) if model.freeze_encoder else None
    val_ids = val_mask = None
    if val is not None:
        val = ValidationSet(*val)
        val_ids, val_mask = _tokenize(tokenizer, val.texts, max_length)
    return _Prepared(ids, mask, codes, states, val, val_ids, val_mask)


class TrainBatch(NamedTuple):
    """One (share of a) batch: token ids and mask (unused when ``encoded`` is given), targets, and
    the frozen encoder's states when they were computed beforehand."""

    input_ids: Tensor | None
    attention_mask: Tensor | None
    codes: Tensor
    encoded: EncoderStates | None = None


def autocast(device: torch.device | str, precision: str):
    """The forward pass's autocast: bfloat16 for ``bf16`` (on CUDA and, for the tests, on the CPU), none for ``fp32``."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model: CartModel, optimizer: torch.optim.Optimizer, scheduler: Any, batch: TrainBatch, *,
               consistency_weight: float, grad_clip: float, precision: str = "fp32", grad_weight: float = 1.0,
               reduce_grads: Callable[[list[torch.nn.Parameter]], None] | None = None) -> Tensor:
    """One optimizer step on ``batch``: forward (under :func:`autocast`), backward, ``reduce_grads``
    (the data-parallel all-reduce), clipping, AdamW and scheduler steps.

    ``grad_weight``: the factor of this batch's mean loss in the gradient (a rank's share of the
    global batch). Returns a detached float32 (4,) tensor on the model's device (no host sync): the
    batch's (loss, ce, kl) and the gradient's global norm before clipping (the same on every rank).
    An empty share (``codes`` with 0 rows) only joins the all-reduce."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    if batch.codes.shape[0]:
        with autocast(model.device, precision):
            parts = cart_loss(model, batch.input_ids, batch.attention_mask, batch.codes,
                              consistency_weight=consistency_weight, encoded=batch.encoded)
        (parts.loss if grad_weight == 1.0 else parts.loss * grad_weight).backward()
        vals = torch.stack([p.detach().float() for p in parts])
    else:
        vals = torch.zeros(3, device=model.device)
    if reduce_grads is not None:
        reduce_grads(trainable)
    # max_norm inf: only measures (scales by exactly 1); the norm shows the all-reduce summed the right gradient
    norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    return torch.cat([vals, norm.detach().float().reshape(1).to(vals.device)])


def _fit(model: CartModel, data: _Prepared, s: _Schedule, *, key: WeightsKey, ckpt_path: Path | None, resume: bool,
         progress: bool, on_epoch_end: Callable[[int, dict[str, float]], None] | None,
         stop_after: int | None) -> tuple[list[dict[str, float]], int | None]:
    """The epochs, on this process's rank (the whole batch when alone); returns the history and the
    best validation epoch, whose weights the model then holds (None without validation)."""
    info = rank_info()
    progress = progress and info.is_main
    device = model.device
    q = len(data.ids)
    lengths = data.mask.sum(1)
    ids, mask, codes = data.ids, data.mask, data.codes
    if device.type == "cuda":  # pinned host memory: the per-batch copies run asynchronously
        ids, mask, codes = ids.pin_memory(), mask.pin_memory(), codes.pin_memory()
    states = None if data.states is None else data.states.to_device_if_fits(device)
    val = data.val
    if val is not None:
        val_index = val.prefix_index.to(device)
        val_items = torch.as_tensor(val.items).long().reshape(len(val.texts), -1).to(device)  # (Q_val, R)
        val_beam = max(1, min(s.val_beam, val_index.n_items))

    steps_per_epoch = math.ceil(q / s.batch_size)
    total_steps = s.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total_steps, s.warmup_ratio))

    start_epoch, history, best = 0, [], None
    restored = _restore(ckpt_path, model, optimizer, scheduler, key) if resume and ckpt_path.exists() else None
    if restored is not None:
        start_epoch, history, best = restored
    else:
        _seed_everything(s.seed + info.rank)
    reduce = all_reduce_grads if info.world > 1 else None
    last_epoch = s.epochs if stop_after is None else min(s.epochs, start_epoch + stop_after)
    if _stops(history, best, s.patience):  # a resumed run that had already stopped early
        last_epoch = start_epoch

    from tqdm.auto import tqdm  # progress bars only; imported late to keep the module light

    epoch_bar = tqdm(range(start_epoch, last_epoch), desc="train CART", disable=not progress, initial=start_epoch,
                     total=s.epochs)
    for epoch in epoch_bar:
        t0 = time.perf_counter()
        model.train()
        batches = length_bucketed_batches(lengths, s.batch_size, seed=s.seed + epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        norms = torch.zeros((), dtype=torch.float64, device=device)
        batch_bar = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
        for step, global_idx in enumerate(batch_bar):
            idx = shard(global_idx, info)  # this rank's share of the global batch
            n = idx.numel()
            if n:
                width = int(lengths[idx].max())  # trim the share to its longest text
                batch = TrainBatch(ids[idx, :width].to(device, non_blocking=True),
                                   mask[idx, :width].to(device, non_blocking=True),
                                   codes[idx].to(device, non_blocking=True),
                                   None if states is None else states.batch(idx, device))
            else:
                batch = TrainBatch(None, None, codes[:0].to(device))
            vals = train_step(model, optimizer, scheduler, batch, consistency_weight=s.consistency_weight,
                              grad_clip=s.grad_clip, precision=s.precision,
                              grad_weight=share_weight(n, global_idx.numel()) if info.world > 1 else 1.0,
                              reduce_grads=reduce)
            sums += vals[:3].double() * n
            norms += vals[3].double()
            if progress and step % 25 == 0:  # reading the loss waits for the device: not every step
                batch_bar.set_postfix(loss=f"{float(vals[0]):.4f}")
        batch_bar.close()
        mean = (all_reduce_sum(sums) / q).tolist()
        record = {
            "epoch": epoch + 1,
            "loss": mean[0],
            "ce": mean[1],
            "kl": mean[2],
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(norms) / len(batches),  # mean over the steps, before clipping
            "seconds": time.perf_counter() - t0,
        }
        if val is not None:
            record["val_recall_at_1"] = _recall_at_1(
                model, data.val_ids, data.val_mask, val_items, val_index, beam=val_beam, batch_size=s.val_batch_size
            )
            if best is None or record["val_recall_at_1"] > best["val_recall_at_1"]:
                best = {"epoch": epoch + 1, "val_recall_at_1": record["val_recall_at_1"],
                        "model": {k: v.detach().clone() for k, v in _model_state(model).items()}}
        history.append(record)
        epoch_bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "val_recall_at_1") if k in record})
        rng = gather_objects(_rng_state())  # every rank's RNG state, so a resumed run draws the same dropout
        if ckpt_path is not None and info.is_main:
            _save(ckpt_path, model, optimizer, scheduler, epoch + 1, history, key, rng, best)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
        if _stops(history, best, s.patience):
            break
    epoch_bar.close()
    if best is not None:  # the best validation epoch's weights (the same on every rank)
        model.load_state_dict(best["model"], strict=False)
    model.eval()
    return history, None if best is None else best["epoch"]


def _stops(history: list[dict[str, float]], best: dict | None, patience: int) -> bool:
    """Early stopping: ``patience`` epochs in a row without a better validation recall@1."""
    return patience > 0 and best is not None and bool(history) and history[-1]["epoch"] - best["epoch"] >= patience


class _ModelSpec(NamedTuple):
    """A CartModel as constructor arguments + weights: what a worker process rebuilds it from (the
    module itself does not pickle: transformers installs closures as forward hooks)."""

    encoder_class: type
    encoder_config: Any
    kwargs: dict[str, Any]
    state: dict[str, Tensor]  # on the CPU (shared memory on the way to the workers)

    @classmethod
    def of(cls, model: CartModel) -> "_ModelSpec":
        kwargs = dict(freeze_encoder=model.freeze_encoder, level_sizes=model.level_sizes, d_model=model.d_model,
                      n_layers=len(model.layers), n_heads=model.n_heads, dropout=float(model.emb_drop.p),
                      fusion=model.fusion_mode, d_ff=model.layers[0].ff[0].out_features if len(model.layers) else None)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return cls(type(model.encoder), model.encoder.config, kwargs, state)

    def build(self) -> CartModel:
        model = CartModel(text_encoder=self.encoder_class(self.encoder_config), **self.kwargs)
        model.load_state_dict(self.state)  # strict: the rebuilt architecture must be the same
        return model


class _WorkerJob(NamedTuple):
    model: _ModelSpec  # each worker rebuilds the model and moves it to its device
    data: _Prepared
    schedule: _Schedule
    key: WeightsKey
    ckpt_path: Path
    resume: bool
    progress: bool
    stop_after: int | None
    device: str  # the device the caller trains on (cuda → one GPU per worker)


def _worker(job: _WorkerJob) -> list[dict[str, float]] | None:
    """One data-parallel rank (a process started by :func:`cartlib.distributed.launch`)."""
    import torch.distributed as dist

    device = worker_device(torch.device(job.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device))
    try:
        model = job.model.build().to(device)
        broadcast_parameters(model)
        history, _ = _fit(model, job.data, job.schedule, key=job.key, ckpt_path=job.ckpt_path, resume=job.resume,
                          progress=job.progress, on_epoch_end=None, stop_after=job.stop_after)
        is_main = rank_info().is_main
    finally:
        dist.destroy_process_group()
    return history if is_main else None


def _train_in_workers(model: CartModel, tokenizer: Any, texts: Sequence[str], codes: Tensor, max_length: int,
                      val: ValidationSet | tuple | None, s: _Schedule, *, key: WeightsKey,
                      checkpoint_dir: Path | str | None, resume: bool, progress: bool,
                      on_epoch_end: Callable[[int, dict[str, float]], None] | None, stop_after: int | None,
                      nproc: int) -> TrainResult:
    """``nproc`` local workers train; rank 0's checkpoint brings the weights and history back."""
    import tempfile

    device = model.device
    with tempfile.TemporaryDirectory(prefix="cart-train-") as tmp:
        ckpt_path = Path(checkpoint_dir if checkpoint_dir is not None else tmp) / CHECKPOINT_NAME
        done = _finished_checkpoint(ckpt_path, key, s) if resume and ckpt_path.exists() else None
        if done is None:  # a finished run (e.g. by torchrun on a cluster) is only loaded, never relaunched
            data = _prepare(model, tokenizer, texts, codes, max_length, val, progress=progress)
            job = _WorkerJob(_ModelSpec.of(model), data, s, key, ckpt_path, resume, progress, stop_after, str(device))
            launch(_worker, job, nproc=nproc)
            done = torch_load(ckpt_path)
        best = done.get("best")
        model.load_state_dict(done["model"] if best is None else best["model"], strict=False)
        history = list(done["history"])
    model.to(device).eval()
    if on_epoch_end is not None:
        for record in history:
            on_epoch_end(record["epoch"], record)
    return TrainResult(model=model, history=history, best_epoch=None if best is None else int(best["epoch"]))


def _finished_checkpoint(path: Path, key: WeightsKey, s: _Schedule) -> dict | None:
    """The checkpoint at ``path`` when it was written under ``key`` and its run is over (all epochs,
    or stopped early); else None."""
    try:
        ck = torch_load(path)
    except ValueError:
        return None
    if not isinstance(ck, dict) or ck.get("format") != _FORMAT or key.stale_reason(ck.get("key")) is not None:
        return None
    over = int(ck["epoch"]) >= s.epochs or _stops(list(ck["history"]), ck.get("best"), s.patience)
    return ck if over else None


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

    def to_device_if_fits(self, device: torch.device | str, *, fraction: float = 0.25) -> "EncodedTexts":
        """The states on ``device`` when they take under ``fraction`` of its free memory (a GPU:
        no host-to-device copy per batch), else unchanged on the CPU."""
        device = torch.device(device)
        if device.type != "cuda":
            return self
        free, _ = torch.cuda.mem_get_info(device)
        if self.flat.numel() * self.flat.element_size() > fraction * free:
            return self
        return self._replace(flat=self.flat.to(device))

    def batch(self, idx: Tensor, device: torch.device | str) -> EncoderStates:
        """The states of texts ``idx`` padded to the longest: ``layers (S, B, T, D)`` float32."""
        device = torch.device(device)
        width = int(self.lengths[idx].max())
        pos = torch.arange(width)
        valid = pos < self.lengths[idx, None]  # (B, T)
        rows = torch.where(valid, self.offsets[idx, None] + pos, 0)
        layers = self.flat[rows.to(self.flat.device)]
        if layers.device != device and device.type == "cuda":  # pinned: the copy overlaps the GPU's work
            layers = layers.pin_memory()
        layers = layers.to(device, torch.float32, non_blocking=True).permute(2, 0, 1, 3)  # (S, B, T, D)
        valid = valid.to(device, non_blocking=True)
        return EncoderStates(layers * valid[None, :, :, None], valid)


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
    """Validation recall@1; with several ranks each decodes every ``world``-th query and the hits are summed."""
    model.eval()
    info = rank_info()
    mine = torch.arange(info.rank, ids.shape[0], info.world)
    hits = torch.zeros((), dtype=torch.float64, device=model.device)
    with torch.no_grad():
        for lo in range(0, len(mine), batch_size):
            rows = mine[lo : lo + batch_size]
            m = mask[rows]
            width = int(m.sum(1).max())
            enc = model.encode(ids[rows, :width].to(model.device), m[:, :width].to(model.device))
            out = constrained_beam_search(model, enc, index, beam=beam, top_k=1,
                                          precision=default_precision(model.device))  # fp16 on CUDA, as evaluate
            top = out.items[:, :1]  # (B, 1); -1 never matches a relevant row
            hits += ((top == items[rows.to(items.device)]) & (top >= 0)).any(1).sum()
    model.train()
    return float(all_reduce_sum(hits)) / ids.shape[0]


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


def _save(path: Path, model, optimizer, scheduler, epoch: int, history, key: WeightsKey,
          rng_ranks: list[dict[str, Any]], best: dict | None = None) -> None:
    torch_save(
        {
            "format": _FORMAT,
            "epoch": epoch,
            "model": _model_state(model),
            "frozen_encoder": model.freeze_encoder,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks,  # one per data-parallel rank
            "best": best,  # the best validation epoch so far: epoch, val_recall_at_1, its weights
            "history": history,
            "key": key.as_dict(),
        },
        path,
    )


def _restore(path: Path, model, optimizer, scheduler, key: WeightsKey) -> tuple[int, list[dict[str, float]], dict | None] | None:
    """Load the checkpoint at ``path`` into the model, optimizer, scheduler and RNGs and return
    (epochs done, history, best epoch so far); None, touching nothing, when it is stale (the reason
    is printed)."""
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
    info = rank_info()
    ranks = ck.get("rng_ranks") or [ck["rng"]]
    if len(ranks) != info.world:  # the key holds the process count, so only a corrupted file gets here
        raise ValueError(f"{path}: checkpoint of {len(ranks)} rank(s) resumed by {info.world}")
    _set_rng_state(ranks[info.rank])
    best = ck.get("best")
    if best is not None:
        best = {**best, "model": {k: v.to(model.device) for k, v in best["model"].items()}}
    return int(ck["epoch"]), list(ck["history"]), best
