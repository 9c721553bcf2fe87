"""CART model: the text encoder + compact identifier decoder and its coarse-to-fine fusion
(CART, Fang et al., ACL 2025)."""
from cartlib.model.cart import (
    BOS,
    PAD,
    CartModel,
    CartOutput,
    DecoderCache,
    DecoderMemory,
    EncoderStates,
    StepOutput,
)
from cartlib.model.fusion import CoarseToFineFusion, CrossAttention, FusionMemory, FusionMode, LayerExperts

__all__ = [
    "BOS",
    "PAD",
    "CartModel",
    "CartOutput",
    "CoarseToFineFusion",
    "CrossAttention",
    "DecoderCache",
    "DecoderMemory",
    "EncoderStates",
    "FusionMemory",
    "FusionMode",
    "LayerExperts",
    "StepOutput",
]
