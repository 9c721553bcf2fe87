"""The CART model: a pretrained text encoder + a compact autoregressive identifier decoder.

CART (Fang et al., ACL 2025) generates the identifier ``(k, v_1, …, v_M, u)`` of the relevant
candidate from the query text: ``p(id | q) = Π_l p(c_l | c_<l, q)``. The encoder reads the query;
every decoder layer is pre-LN ``causal self-attention → coarse-to-fine fusion (the cross-attention
over all S encoder layers, see :mod:`cartlib.model.fusion`) → FFN``.

Identifier tokens follow the shared :class:`cartlib.ids.vocab.Vocabulary`: 0 PAD, 1 BOS, then the
codes of level 0, level 1, … in disjoint ranges starting at ``offsets[l] = 2 + Σ_{j<l} K_j``. The
decoder input at position ``l`` is BOS (l = 0) or the token of code ``c_{l-1}``; a learned position
embedding per level tells the levels apart; the output at position ``l`` is scored only against
level ``l``'s codes, so ``logits[l]`` has shape ``(B, K_l)``.

Encoder layers: ``S`` = the encoder's number of transformer layers. HF ``hidden_states`` also
holds the embedding output (index 0); CART fuses the outputs of the encoder *layers*, so it is
skipped.

Two decoder paths share the weights: :meth:`CartModel.decode` (teacher forcing over whole
identifiers, for training and exhaustive scoring) and :meth:`CartModel.step` (one level at a time
with a self-attention KV cache, for beam search). Encoder-side keys/values of every
cross-attention are computed once per query (:meth:`CartModel.memory`); beams of one query share
them by being laid out as one query sequence of the cross-attention, never copied.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cartlib.ids.vocab import Vocabulary
from cartlib.model.fusion import CoarseToFineFusion, EncoderLayers, FusionMemory, FusionMode

__all__ = [
    "CartModel",
    "EncoderStates",
    "CartOutput",
    "DecoderMemory",
    "DecoderCache",
    "StepOutput",
    "PAD",
    "BOS",
]

PAD, BOS = Vocabulary.PAD, Vocabulary.BOS  # special tokens of the identifier vocabulary


class EncoderStates(NamedTuple):
    """Outputs of all S encoder layers for a batch of queries."""

    layers: Tensor  # (S, B, T, D_enc)
    mask: Tensor  # (B, T) bool, True = real token

    def select(self, index: Tensor) -> "EncoderStates":
        """The states of queries ``index (B',)``."""
        return EncoderStates(self.layers.index_select(1, index), self.mask.index_select(0, index))


class CartOutput(NamedTuple):
    """Teacher-forced logits, one tensor per identifier level."""

    logits: tuple[Tensor, ...]  # L tensors (B, K_l), or (B, G, K_l) for G identifiers per query


class DecoderMemory(NamedTuple):
    """Encoder side of every decoder layer's fusion block, computed once per query."""

    layers: tuple[FusionMemory | EncoderLayers, ...]  # one per decoder layer


class DecoderCache(NamedTuple):
    """Self-attention keys/values of the decoded positions, per decoder layer."""

    keys: tuple[Tensor, ...]  # (B*W, H, t, Dh) per layer, W beams per query, t decoded positions
    values: tuple[Tensor, ...]

    def reorder(self, index: Tensor) -> "DecoderCache":
        """Keep/duplicate beams: row ``i`` of the result is row ``index[i]`` of this cache."""
        return DecoderCache(
            tuple(k.index_select(0, index) for k in self.keys),
            tuple(v.index_select(0, index) for v in self.values),
        )


class StepOutput(NamedTuple):
    """One incremental decoding step."""

    logits: Tensor  # (B, W, K_l) scores of level l's codes for each of W beams
    cache: DecoderCache


class SelfAttention(nn.Module):
    """Causal multi-head self-attention over identifier positions, with an optional KV cache."""

    def __init__(self, *, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x (N, T, D)``; ``past`` keys/values ``(N, H, t, Dh)`` of earlier positions or None."""
        n, t, d = x.shape
        if past is not None and t != 1:
            raise ValueError("cached self-attention decodes one position at a time")
        q, k, v = self.qkv(x).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if past is not None:  # new positions attend to all cached ones: no mask needed for T = 1
            k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
        p = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and t > 1, dropout_p=p)
        return self.out_proj(h.transpose(1, 2).reshape(n, t, d)), (k, v)


class DecoderLayer(nn.Module):
    """Pre-LN decoder layer: causal self-attention, fusion cross-attention, FFN."""

    def __init__(
        self, *, d_model: int, d_enc: int, n_enc_layers: int, n_heads: int, d_ff: int, dropout: float, fusion: FusionMode
    ) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(d_model)
        self.self_attn = SelfAttention(d_model=d_model, n_heads=n_heads, dropout=dropout)
        self.ln_cross = nn.LayerNorm(d_model)
        self.fusion = CoarseToFineFusion(
            d_model=d_model, d_enc=d_enc, n_enc_layers=n_enc_layers, n_heads=n_heads, dropout=dropout, mode=fusion
        )
        self.ln_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, memory: FusionMemory, past: tuple[Tensor, Tensor] | None, group: int
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x (B*G, T, D)``: G sequences per query (identifiers or beams) sharing ``memory``."""
        n, t, d = x.shape
        h, kv = self.self_attn(self.ln_self(x), past)
        x = x + self.drop(h)
        # cross-attention: the G*T positions of a query form one query sequence over its memory
        y = self.fusion(self.ln_cross(x).view(n // group, group * t, d), memory).view(n, t, d)
        x = x + self.drop(y)
        x = x + self.drop(self.ff(self.ln_ff(x)))
        return x, kv


class CartModel(nn.Module):
    """CART encoder-decoder for generative cross-modal retrieval (Fang et al., ACL 2025).

    ``text_encoder``: a HF BERT-like model (called with ``output_hidden_states=True``; all of its
    S transformer layers feed the fusion). ``freeze_encoder``: keep it fixed (no gradient, always
    in eval mode). ``level_sizes``: ``(K_0, …, K_{L-1})``. ``fusion``: True = CART's two-branch
    fusion, False = plain cross-attention to the last encoder layer ("w/o fusion"), or a
    :class:`FusionMode`. ``d_ff``: FFN width (default 4·d_model).
    """

    def __init__(
        self,
        *,
        text_encoder: nn.Module,
        freeze_encoder: bool,
        level_sizes: Sequence[int],
        d_model: int = 384,
        n_layers: int = 2,
        n_heads: int = 6,
        dropout: float = 0.1,
        fusion: bool | FusionMode = True,
        d_ff: int | None = None,
    ) -> None:
        super().__init__()
        self.level_sizes = tuple(int(k) for k in level_sizes)
        if not self.level_sizes or min(self.level_sizes) < 1:
            raise ValueError(f"level_sizes must be a non-empty list of sizes >= 1, got {level_sizes}")
        if isinstance(fusion, bool):
            fusion = FusionMode.TWO_BRANCH if fusion else FusionMode.LAST_LAYER
        self.fusion_mode = FusionMode(fusion)
        self.encoder = text_encoder
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        cfg = text_encoder.config
        self.n_enc_layers, self.d_enc = int(cfg.num_hidden_layers), int(cfg.hidden_size)
        self.vocab = Vocabulary(level_sizes=self.level_sizes)  # the shared token layout
        self.offsets, self.vocab_size = self.vocab.offsets, self.vocab.size
        self.d_model, self.n_heads = d_model, n_heads

        self.tok_emb = nn.Embedding(self.vocab_size, d_model)
        self.pos_emb = nn.Embedding(len(self.level_sizes), d_model)  # one learned position per level
        self.emb_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(
                d_model=d_model,
                d_enc=self.d_enc,
                n_enc_layers=self.n_enc_layers,
                n_heads=n_heads,
                d_ff=d_ff or 4 * d_model,
                dropout=dropout,
                fusion=self.fusion_mode,
            )
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, self.vocab_size)  # row v scores vocabulary token v
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    # ----------------------------------------------------------------- basics
    @property
    def depth(self) -> int:
        """L, the identifier length."""
        return len(self.level_sizes)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def train(self, mode: bool = True) -> "CartModel":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder never drops out
        return self

    # ---------------------------------------------------------------- encoder
    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> EncoderStates:
        """Run the text encoder; keep the outputs of all S layers (embedding output skipped)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        layers = torch.stack(tuple(out.hidden_states[1:]), 0)  # (S, B, T, D_enc)
        return EncoderStates(layers=layers, mask=attention_mask.bool())

    def memory(self, encoded: EncoderStates) -> DecoderMemory:
        """Encoder-side keys/values of every cross-attention of every decoder layer."""
        return DecoderMemory(tuple(layer.fusion.memory(encoded.layers, encoded.mask) for layer in self.layers))

    # ------------------------------------------------------- teacher forcing
    def forward(self, input_ids: Tensor, attention_mask: Tensor, codes: Tensor) -> CartOutput:
        """Teacher-forced per-level logits for target identifiers ``codes (B, L)``."""
        return self.decode(self.encode(input_ids, attention_mask), codes)

    def decode(self, encoded: EncoderStates, codes: Tensor, memory: DecoderMemory | None = None) -> CartOutput:
        """Teacher forcing: ``codes (B, L)`` -> logits ``(B, K_l)`` per level, or ``codes (B, G, L)``
        (G identifiers per query, e.g. every candidate for exhaustive scoring) -> ``(B, G, K_l)``.

        Without ``memory``, one identifier per query (training) attends to the encoder layers in
        the absorbed form (:class:`cartlib.model.fusion.EncoderLayers`, cheaper when L < T);
        otherwise the encoder-side keys/values are formed once and shared by the G identifiers."""
        grouped = codes.dim() == 3
        if not grouped:
            codes = codes[:, None, :]
        b, g, depth = codes.shape
        if depth != self.depth:
            raise ValueError(f"codes have L={depth} levels, the model {self.depth}")
        if memory is None and g == 1:
            direct = EncoderLayers(encoded.layers, encoded.mask.bool()[:, None, None, :])
            memory = DecoderMemory((direct,) * len(self.layers))
        elif memory is None:
            memory = self.memory(encoded)
        # inputs: BOS, then the token of c_0 .. c_{L-2}
        offsets = torch.tensor(self.offsets, device=codes.device)
        tokens = torch.cat(
            (torch.full((b, g, 1), BOS, dtype=torch.long, device=codes.device), codes[..., :-1] + offsets[:-1]), -1
        ).view(b * g, depth)
        x = self.emb_drop(self.tok_emb(tokens) + self.pos_emb.weight)  # (B*G, L, D)
        for layer, mem in zip(self.layers, memory.layers):
            x, _ = layer(x, mem, None, g)
        h = self.ln_f(x).view(b, g, depth, -1)
        logits = tuple(self._level_logits(h[:, :, l], l) for l in range(depth))
        return CartOutput(logits if grouped else tuple(z[:, 0] for z in logits))

    # ------------------------------------------------------------ incremental
    def step(
        self, memory: DecoderMemory, cache: DecoderCache | None, prev_codes: Tensor | None, level: int
    ) -> StepOutput:
        """One decoding step at ``level`` for ``W`` beams per query.

        ``prev_codes (B, W)``: the level-``level-1`` codes just chosen (None at level 0, where
        each query has one beam starting from BOS). ``cache``: from the previous step (reordered
        to the surviving beams), None at level 0. Returns logits ``(B, W, K_level)``.
        """
        b = memory.layers[0].mask.shape[0]
        if level == 0:
            if prev_codes is not None or cache is not None:
                raise ValueError("level 0 starts from BOS: pass prev_codes=None and cache=None")
            tokens = torch.full((b, 1), BOS, dtype=torch.long, device=memory.layers[0].mask.device)
        else:
            if prev_codes is None or cache is None:
                raise ValueError(f"level {level} needs the previous codes and the cache")
            if cache.keys[0].shape[2] != level:
                raise ValueError(f"cache holds {cache.keys[0].shape[2]} positions, level {level} needs {level}")
            tokens = prev_codes + self.offsets[level - 1]
        w = tokens.shape[1]
        x = self.emb_drop(self.tok_emb(tokens.reshape(b * w, 1)) + self.pos_emb.weight[level])  # (B*W, 1, D)
        keys, values = [], []
        for i, (layer, mem) in enumerate(zip(self.layers, memory.layers)):
            x, (k, v) = layer(x, mem, None if cache is None else (cache.keys[i], cache.values[i]), w)
            keys.append(k)
            values.append(v)
        logits = self._level_logits(self.ln_f(x).view(b, w, -1), level)
        return StepOutput(logits=logits, cache=DecoderCache(tuple(keys), tuple(values)))

    def _level_logits(self, h: Tensor, level: int) -> Tensor:
        """``h (..., D)`` -> logits over level ``level``'s codes only ``(..., K_level)``."""
        lo = self.offsets[level]
        hi = lo + self.level_sizes[level]
        return F.linear(h, self.head.weight[lo:hi], self.head.bias[lo:hi])
