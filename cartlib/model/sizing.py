"""Trainable-parameter counts, and the plain cross-attention decoder matched in size to CART's.

"w/o fusion" (cross-attention to the last encoder layer) removes the fusion blocks' weights with
the fusion, so its drop mixes fusion with capacity. The matched control gives the plain decoder
the fused decoder's trainable-parameter count back through a wider feed-forward layer (``d_ff``):
the count is linear in ``d_ff``, so two sizes built on the meta device (no memory, no weights)
give it exactly.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cartlib.model.cart import CartModel
from cartlib.model.fusion import FusionMode

__all__ = ["trainable_parameters", "matched_d_ff"]


def trainable_parameters(model: nn.Module) -> int:
    """The number of weights the optimizer updates (a frozen encoder's are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _decoder_size(encoder: nn.Module, *, level_sizes: Sequence[int], d_model: int, n_layers: int, n_heads: int,
                  fusion: FusionMode, d_ff: int | None) -> int:
    """Trainable weights of a decoder on ``encoder`` (frozen: only the decoder counts), built on the meta device."""
    with torch.device("meta"):
        model = CartModel(text_encoder=_Frozen(encoder), freeze_encoder=True, level_sizes=level_sizes,
                          d_model=d_model, n_layers=n_layers, n_heads=n_heads, fusion=fusion, d_ff=d_ff)
    return trainable_parameters(model)


class _Frozen(nn.Module):
    """A stand-in with the encoder's config and no weights (the count must not touch the real encoder)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.config = encoder.config


def matched_d_ff(encoder: nn.Module, *, level_sizes: Sequence[int], d_model: int, n_layers: int, n_heads: int,
                 fusion: FusionMode, target: FusionMode = FusionMode.TWO_BRANCH) -> tuple[int, int, int]:
    """The feed-forward width that gives a ``fusion`` decoder the trainable-parameter count of a
    ``target`` decoder of the same width and depth (default d_ff = 4·d_model).

    Returns ``(d_ff, its parameter count, the target's count)``."""
    kw = dict(level_sizes=level_sizes, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    want = _decoder_size(encoder, fusion=target, d_ff=None, **kw)
    lo, hi = 4 * d_model, 8 * d_model
    p_lo, p_hi = (_decoder_size(encoder, fusion=fusion, d_ff=d, **kw) for d in (lo, hi))
    per_unit = (p_hi - p_lo) / (hi - lo)  # weights per unit of d_ff (both FFN matrices and a bias)
    d_ff = max(1, round(lo + (want - p_lo) / per_unit))
    return d_ff, _decoder_size(encoder, fusion=fusion, d_ff=d_ff, **kw), want
