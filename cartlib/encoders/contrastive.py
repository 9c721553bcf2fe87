"""Train a media tower against frozen text vectors with the symmetric InfoNCE loss (CLIP-style).

The text side is frozen (MiniLM sentence vectors), so one batch costs only the media tower.
A pure function: no file I/O; it returns the trained model and its per-epoch history.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class TowerTrainResult(NamedTuple):
    model: nn.Module
    history: list[dict]  # per epoch: {"epoch", "loss", "temperature", "seconds"}


def info_nce(media: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched (media_i, text_i) unit vectors, (B, D) each."""
    logits = logit_scale.exp() * media @ text.T  # (B, B)
    target = torch.arange(len(media), device=media.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_tower(model: nn.Module, *, media: np.ndarray, text: np.ndarray, epochs: int, batch_size: int,
                lr: float, weight_decay: float, temperature: float, seed: int, device: str = "cpu",
                progress: bool = False) -> TowerTrainResult:
    """media (N, ...) raw arrays; text (N, C, D) the C caption vectors of each item (one drawn per step)."""
    import time

    from tqdm.auto import tqdm

    if len(media) != len(text):
        raise ValueError(f"media has {len(media)} items but text has {len(text)}")
    if len(media) < 2:
        raise ValueError("contrastive training needs at least 2 items")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout / init on CPU
    model = model.to(device)
    logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature), device=device))
    opt = torch.optim.AdamW([*model.parameters(), logit_scale], lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(media) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    text_t = torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32))
    media_t = torch.from_numpy(np.ascontiguousarray(media))
    history = []
    bar = tqdm(range(epochs), desc="train media tower", disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        start, total, count = time.perf_counter(), 0.0, 0
        perm = torch.randperm(len(media), generator=gen)
        pick = torch.randint(text_t.shape[1], (len(media),), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            if len(idx) < 2:
                continue
            m = model(media_t[idx].to(device))
            t = text_t[idx, pick[idx]].to(device)
            loss = info_nce(m, t, logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                logit_scale.clamp_(max=math.log(100.0))  # temperature ≥ 0.01
            total += loss.item() * len(idx)
            count += len(idx)
        row = {"epoch": epoch + 1, "loss": total / max(count, 1), "temperature": float(1 / logit_scale.detach().exp()),
               "seconds": time.perf_counter() - start}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    model.eval()
    return TowerTrainResult(model, history)


@torch.inference_mode()
def embed_media(model: nn.Module, media: np.ndarray, *, batch_size: int = 512, device: str = "cpu",
                progress: bool = False) -> np.ndarray:
    """(N, ...) raw media → (N, D) float32 unit vectors, in batches (media may be a memmap)."""
    from tqdm.auto import tqdm

    model = model.to(device).eval()
    out = []
    for start in tqdm(range(0, len(media), batch_size), desc="embed media", disable=not progress, unit="batch"):
        chunk = torch.from_numpy(np.ascontiguousarray(media[start:start + batch_size])).to(device)
        out.append(model(chunk).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
