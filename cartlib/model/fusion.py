"""Two-branch coarse-to-fine fusion of all encoder layers (CART, Fang et al., ACL 2025).

CART's decoder does not read only the last encoder layer: every decoder layer cross-attends to all
``S`` encoder layers ``E_1..E_S`` through two branches whose outputs are added (the description
is second-hand, see ``CART.md``; the choices below fill its gaps and are parameters or documented):

- coarse branch:  ``Z = W_z [E_1; …; E_S] + b_z``  (layers concatenated along features, projected to
  D), ``a = CrossAttn(Y, Z)``, then a self-gated sigmoid ``c = σ(W_g a + b_g) ⊙ a``. The paper names a
  sigmoid self-gate without its formula; we gate the attention output by a sigmoid of a linear map
  of itself (the GLU / SiLU form), so the branch can damp channels it finds unreliable.
- fine branch:  ``f = Σ_i α_i ⊙ CrossAttn_i(Y, E_i)``, one cross-attention per encoder layer (each
  layer an "expert"). ``α ∈ R^{S×D}``: per-channel weights (the ``⊙`` of the formula), normalised
  by a softmax over the S layers so the branch is a convex mixture of experts, initialised uniform
  (α_i = 1/S). Normalising keeps the fine branch on the scale of one attention, whatever S is.
- output ``coarse + fine``.

"Without fusion" (the paper's ablation) is :attr:`FusionMode.LAST_LAYER`: an ordinary
multi-head cross-attention to the last encoder layer only. :attr:`FusionMode.COARSE` and
:attr:`FusionMode.FINE` keep one branch, for finer ablations.

Every cross-attention has its encoder-side keys/values precomputed once per query by
:meth:`CoarseToFineFusion.memory`; :meth:`CoarseToFineFusion.forward` then only projects the
decoder queries. Cross-attention treats query positions independently, so the queries of all beams
of one input can share its memory as one query sequence ``(B, beams, D)``: no copy per beam.

Training has the opposite shape: few decoder positions (the L identifier tokens) per query and
many encoder tokens (T ≈ 25) in S + 1 memories, so projecting every encoder token to keys and
values dominates the cost. :class:`EncoderLayers` selects the *absorbed* form instead, exact
because the projections are linear: ``q·(W_k e + b_k) = (W_kᵀ q)·e + const`` (the constant
cancels in the softmax) and ``Σ_t p_t (W_v e_t + b_v) = W_v (Σ_t p_t e_t) + b_v Σ_t p_t``; the keys
and values are never formed, and the cost scales with the decoder positions, not with T.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FusionMode", "KV", "FusionMemory", "EncoderLayers", "CrossAttention", "LayerExperts", "CoarseToFineFusion"]


class FusionMode(Enum):
    """Which encoder layers the decoder cross-attends to, and how."""

    LAST_LAYER = "last_layer"  # "w/o fusion": plain cross-attention to E_S
    COARSE = "coarse"  # coarse branch only
    FINE = "fine"  # fine branch only
    TWO_BRANCH = "two_branch"  # CART: coarse + fine


class KV(NamedTuple):
    """Precomputed keys and values of a cross-attention."""

    k: Tensor  # (B, H', T, Dh), H' = H heads (or S*H for the stacked experts)
    v: Tensor  # (B, H', T, Dh)


class FusionMemory(NamedTuple):
    """Encoder side of a fusion block, computed once per query (branches not in use are None)."""

    coarse: KV | None
    fine: KV | None
    last: KV | None
    mask: Tensor  # (B, 1, 1, T) bool, True = real token (attend)


class EncoderLayers(NamedTuple):
    """Raw encoder layers as a fusion block's memory: selects the absorbed attention (training)."""

    layers: Tensor  # (S, B, T, D_enc)
    mask: Tensor  # (B, 1, 1, T) bool, True = real token (attend)


def _absorbed_attention(
    q: Tensor, x: Tensor, mask: Tensor, w_k: Tensor, w_v: Tensor, b_v: Tensor, dropout: float
) -> Tensor:
    """Attention of queries ``q (S, N, H, Tq, Dh)`` over ``x (S, N, T, E)`` (S independent
    attentions, e.g. one per encoder layer) with keys ``W_k,sh x`` and values ``W_v,sh x + b_v,sh``
    never formed (module docstring); ``w_k``, ``w_v`` ``(S, H, Dh, E)``, ``b_v (S, H, Dh)``, ``mask
    (N, 1, 1, T)``. The key bias is left out: it adds a constant per query row, which the softmax
    cancels. Returns ``(S, N, H, Tq, Dh)``."""
    s, n, h, tq, dh = q.shape
    qk = torch.einsum("snhqd,shde->snhqe", q, w_k).reshape(s * n, h * tq, -1)  # W_kᵀ q
    xs = x.reshape(s * n, x.shape[2], -1)
    scores = torch.bmm(qk, xs.transpose(1, 2)).view(s, n, h * tq, -1) / math.sqrt(dh)  # (S, N, H*Tq, T)
    scores = scores.masked_fill(~mask.view(1, n, 1, -1), float("-inf"))
    p = torch.softmax(scores, -1)
    if dropout > 0:
        p = F.dropout(p, dropout)
    ctx = torch.bmm(p.view(s * n, h * tq, -1), xs).view(s, n, h, tq, -1)  # Σ_t p_t e_t
    out = torch.einsum("snhqe,shde->snhqd", ctx, w_v)
    return out + p.sum(-1).view(s, n, h, tq, 1) * b_v[:, None, :, None, :]


def _split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, T, H*Dh) -> (B, H, T, Dh)."""
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, Dh) -> (B, T, H*Dh)."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


class CrossAttention(nn.Module):
    """Multi-head cross-attention ``softmax(Q Kᵀ/√Dh) V`` (Vaswani et al., 2017) whose encoder-side
    K/V are computed once (:meth:`memory`) and reused for every decoding step and beam.

    Same parameterisation as ``nn.MultiheadAttention(d_model, n_heads, kdim=d_kv, vdim=d_kv)``.
    """

    def __init__(self, *, d_model: int, d_kv: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_kv, d_model)
        self.v_proj = nn.Linear(d_kv, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def memory(self, e: Tensor) -> KV:
        """``e (B, T, D_kv)`` -> keys/values ``(B, H, T, Dh)``, contiguous (read at every step)."""
        return KV(
            _split_heads(self.k_proj(e), self.n_heads).contiguous(),
            _split_heads(self.v_proj(e), self.n_heads).contiguous(),
        )

    def forward(self, y: Tensor, kv: KV, mask: Tensor) -> Tensor:
        """``y (B, Tq, D)``, ``mask (B, 1, 1, T)`` -> ``(B, Tq, D)``."""
        q = _split_heads(self.q_proj(y), self.n_heads)  # (B, H, Tq, Dh)
        p = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=mask, dropout_p=p)
        return self.out_proj(_merge_heads(h))

    def direct(self, y: Tensor, e: Tensor, mask: Tensor, pre: nn.Linear | None = None) -> Tensor:
        """Same as ``forward(y, memory(pre(e)))`` without forming keys/values (absorbed form);
        ``pre``: a linear map applied to ``e`` first (the coarse branch's projection), folded in."""
        h = self.n_heads
        w_k, w_v, b_v = self.k_proj.weight, self.v_proj.weight, self.v_proj.bias
        if pre is not None:  # W_k (W_z e + b_z) + b_k: weights W_k W_z; the key bias cancels anyway
            w_k, w_v, b_v = w_k @ pre.weight, w_v @ pre.weight, w_v @ pre.bias + b_v
        d = w_k.shape[0]
        q = _split_heads(self.q_proj(y), h)[None]
        out = _absorbed_attention(q, e[None], mask, w_k.view(1, h, d // h, -1), w_v.view(1, h, d // h, -1),
                                  b_v.view(1, h, -1), self.dropout if self.training else 0.0)
        return self.out_proj(_merge_heads(out[0]))


class LayerExperts(nn.Module):
    """Fine branch of CART's fusion: ``Σ_i α_i ⊙ CrossAttn_i(Y, E_i)``, i = 1..S.

    The S cross-attentions have separate weights, stored stacked so that all S run as one
    projection, one attention call over ``S*H`` heads and one output projection, in which the
    mixing weights are folded: ``Σ_i α_i ⊙ (W_o,i h_i + b_o,i) = [diag(α_1)W_o,1 … diag(α_S)W_o,S]
    [h_1; …; h_S] + Σ_i α_i ⊙ b_o,i``.
    """

    def __init__(self, *, d_model: int, d_kv: int, n_layers: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        s, d = n_layers, d_model
        self.n_layers, self.n_heads, self.dropout = n_layers, n_heads, dropout
        self.q_weight = nn.Parameter(torch.empty(s, d, d))  # (S, D_out, D_in), like nn.Linear
        self.q_bias = nn.Parameter(torch.zeros(s, d))
        self.k_weight = nn.Parameter(torch.empty(s, d, d_kv))
        self.k_bias = nn.Parameter(torch.zeros(s, d))
        self.v_weight = nn.Parameter(torch.empty(s, d, d_kv))
        self.v_bias = nn.Parameter(torch.zeros(s, d))
        self.o_weight = nn.Parameter(torch.empty(s, d, d))
        self.o_bias = nn.Parameter(torch.zeros(s, d))
        self.alpha_logits = nn.Parameter(torch.zeros(s, d))  # softmax over S -> α = 1/S at init
        for w in (self.q_weight, self.k_weight, self.v_weight, self.o_weight):
            for i in range(s):  # nn.Linear's default init, per expert
                nn.init.kaiming_uniform_(w[i], a=math.sqrt(5))

    def alpha(self) -> Tensor:
        """Mixing weights ``α (S, D)``, softmax-normalised over the S encoder layers."""
        return torch.softmax(self.alpha_logits, dim=0)

    def memory(self, layers: Tensor) -> KV:
        """``layers (S, B, T, D_kv)`` -> keys/values ``(B, S*H, T, Dh)`` (expert-major heads)."""
        s, b, t, _ = layers.shape
        h = self.n_heads

        def project(w: Tensor, bias: Tensor) -> Tensor:
            x = torch.baddbmm(bias[:, None, :], layers.reshape(s, b * t, -1), w.transpose(1, 2))  # (S, B*T, D)
            return x.view(s, b, t, h, -1).permute(1, 0, 3, 2, 4).reshape(b, s * h, t, -1)

        return KV(project(self.k_weight, self.k_bias), project(self.v_weight, self.v_bias))

    def forward(self, y: Tensor, kv: KV, mask: Tensor) -> Tensor:
        """``y (B, Tq, D)`` -> ``(B, Tq, D)``."""
        s, d = self.q_bias.shape
        q = F.linear(y, self.q_weight.reshape(s * d, d), self.q_bias.reshape(s * d))  # (B, Tq, S*D)
        q = _split_heads(q, s * self.n_heads)  # (B, S*H, Tq, Dh)
        p = self.dropout if self.training else 0.0
        att = _merge_heads(F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=mask, dropout_p=p))
        return self._mix(att)

    def direct(self, y: Tensor, layers: Tensor, mask: Tensor) -> Tensor:
        """Same as ``forward(y, memory(layers))`` in the absorbed form; ``layers (S, B, T, D_kv)``."""
        s, d = self.q_bias.shape
        b, tq, _ = y.shape
        h = self.n_heads
        q = F.linear(y, self.q_weight.reshape(s * d, d), self.q_bias.reshape(s * d))  # (B, Tq, S*D)
        q = q.view(b, tq, s, h, d // h).permute(2, 0, 3, 1, 4)  # (S, B, H, Tq, Dh)
        out = _absorbed_attention(q, layers, mask, self.k_weight.view(s, h, d // h, -1),
                                  self.v_weight.view(s, h, d // h, -1), self.v_bias.view(s, h, -1),
                                  self.dropout if self.training else 0.0)
        att = out.permute(1, 3, 0, 2, 4).reshape(b, tq, s * d)  # (B, Tq, S*H*Dh), expert-major like forward
        return self._mix(att)

    def _mix(self, att: Tensor) -> Tensor:
        """Σ_i α_i ⊙ (W_o,i h_i + b_o,i) for ``att (B, Tq, S*D)`` -> ``(B, Tq, D)``."""
        s, d = self.q_bias.shape
        alpha = self.alpha()  # (S, D)
        w = (alpha[:, :, None] * self.o_weight).permute(1, 0, 2).reshape(d, s * d)  # (D, S*D)
        return F.linear(att, w, (alpha * self.o_bias).sum(0))  # (B, Tq, D)


class CoarseToFineFusion(nn.Module):
    """CART's two-branch coarse-to-fine fusion, used as a decoder layer's cross-attention.

    ``memory(layers (S, B, T, D_enc), mask (B, T))`` precomputes the encoder side once per query;
    ``forward(y (B, Tq, D), memory) -> (B, Tq, D)`` is ``coarse + fine`` (or one branch, or the
    plain last-layer cross-attention, per :class:`FusionMode`).
    """

    def __init__(
        self,
        *,
        d_model: int,
        d_enc: int,
        n_enc_layers: int,
        n_heads: int,
        dropout: float = 0.0,
        mode: FusionMode = FusionMode.TWO_BRANCH,
    ) -> None:
        super().__init__()
        self.mode = FusionMode(mode)
        self.n_enc_layers = n_enc_layers
        use_coarse = self.mode in (FusionMode.COARSE, FusionMode.TWO_BRANCH)
        use_fine = self.mode in (FusionMode.FINE, FusionMode.TWO_BRANCH)
        # coarse: Z = W_z [E_1; ...; E_S] + b_z, cross-attention to Z, self-gate
        self.coarse_proj = nn.Linear(n_enc_layers * d_enc, d_model) if use_coarse else None
        self.coarse_attn = (
            CrossAttention(d_model=d_model, d_kv=d_model, n_heads=n_heads, dropout=dropout) if use_coarse else None
        )
        self.coarse_gate = nn.Linear(d_model, d_model) if use_coarse else None
        # fine: one cross-attention per encoder layer, mixed by α
        self.fine = (
            LayerExperts(d_model=d_model, d_kv=d_enc, n_layers=n_enc_layers, n_heads=n_heads, dropout=dropout)
            if use_fine
            else None
        )
        # w/o fusion: cross-attention to the last layer
        self.last_attn = (
            CrossAttention(d_model=d_model, d_kv=d_enc, n_heads=n_heads, dropout=dropout)
            if self.mode is FusionMode.LAST_LAYER
            else None
        )

    def memory(self, layers: Tensor, mask: Tensor) -> FusionMemory:
        """``layers (S, B, T, D_enc)`` (all encoder layers), ``mask (B, T)`` True = token."""
        s, b, t, d_enc = layers.shape
        if s != self.n_enc_layers:
            raise ValueError(f"fusion was built for S={self.n_enc_layers} encoder layers, got {s}")
        coarse = fine = last = None
        if self.coarse_attn is not None:
            z = self.coarse_proj(layers.permute(1, 2, 0, 3).reshape(b, t, s * d_enc))  # (B, T, D)
            coarse = self.coarse_attn.memory(z)
        if self.fine is not None:
            fine = self.fine.memory(layers)
        if self.last_attn is not None:
            last = self.last_attn.memory(layers[-1])
        return FusionMemory(coarse=coarse, fine=fine, last=last, mask=mask.bool()[:, None, None, :])

    def forward(self, y: Tensor, memory: FusionMemory | EncoderLayers) -> Tensor:
        """``y (B, Tq, D)`` decoder states -> ``(B, Tq, D)``; an :class:`EncoderLayers` memory
        selects the absorbed form (same result, cheaper when Tq is small)."""
        if isinstance(memory, EncoderLayers):
            return self._direct(y, memory.layers, memory.mask)
        if self.last_attn is not None:
            return self.last_attn(y, memory.last, memory.mask)
        out = None
        if self.coarse_attn is not None:
            a = self.coarse_attn(y, memory.coarse, memory.mask)
            out = torch.sigmoid(self.coarse_gate(a)) * a  # self-gated sigmoid
        if self.fine is not None:
            f = self.fine(y, memory.fine, memory.mask)
            out = f if out is None else out + f
        return out

    def _direct(self, y: Tensor, layers: Tensor, mask: Tensor) -> Tensor:
        s, b, t, d_enc = layers.shape
        if s != self.n_enc_layers:
            raise ValueError(f"fusion was built for S={self.n_enc_layers} encoder layers, got {s}")
        if self.last_attn is not None:
            return self.last_attn.direct(y, layers[-1], mask)
        out = None
        if self.coarse_attn is not None:
            a = self.coarse_attn.direct(y, layers.permute(1, 2, 0, 3).reshape(b, t, s * d_enc), mask, pre=self.coarse_proj)
            out = torch.sigmoid(self.coarse_gate(a)) * a
        if self.fine is not None:
            f = self.fine.direct(y, layers, mask)
            out = f if out is None else out + f
        return out
