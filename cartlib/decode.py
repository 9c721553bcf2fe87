"""THE batched beam search over identifiers, constrained by the prefix index (CART inference).

CART (Fang et al., ACL 2025) retrieves by generating identifiers: a beam search, constrained by a
prefix tree of the valid identifiers, returns the beams in score order as the ranked list. The
score of an identifier is its log-probability ``Σ_l log p(c_l | c_<l, q)`` with ``p`` the softmax
over level ``l``'s codes (invalid codes are masked *after* the softmax, as transformers'
``prefix_allowed_tokens_fn`` does, so constrained scores are the same numbers exhaustive scoring
gives).

One implementation serves evaluation, validation during training, the ablation variants, the
tutorial (through the ``on_level`` hook) and the throughput benchmark: :class:`BeamDecoder`.
:func:`constrained_beam_search` / :func:`unconstrained_beam_search` are thin wrappers that reuse
a decoder per model (rebuilt when its weights change).

The search is tensors end to end: the batch × beam grid is one tensor, the only Python loop is over
the L levels, every level is one decoder step (self-attention KV cache, encoder-side K/V computed
once per query), one ``allowed`` gather on the prefix index, one ``topk`` over ``(B, W·K)`` and one
``advance``; beams are reordered by ``index_select``. There is no ``.item()`` or other host sync
inside the level loop (the ``on_level`` hook, when given, may sync), so CPU and GPU run the same
code.

The decoder step is an inference-only re-layout of :meth:`CartModel.step` (same weights, same
maths; the tests hold it to a plain reference search and to :func:`exhaustive_scores`):

- attention is two plain batched matmuls: torch's CPU SDPA kernel costs ~5 ms per call at batch 100
  at these tiny shapes (a handful of decoder positions per query, ~25 encoder tokens);
- the query projections of every cross-attention of a layer are one matmul, and the fine branch's
  α-mixing is folded into its output projection once (the model refolds it at every step);
- beams of a query share its encoder-side keys/values as one query sequence (no copy per beam),
  and those keys/values are computed for real tokens only when much of the batch is padding.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cartlib.ids.prefix import DEAD, PrefixIndex
from cartlib.model.cart import BOS, CartModel, EncoderStates
from cartlib.model.fusion import KV

__all__ = [
    "GenerationOutput", "LevelState", "BeamDecoder", "decoder_for",
    "constrained_beam_search", "unconstrained_beam_search", "exhaustive_scores",
]


class GenerationOutput(NamedTuple):
    """Top-k generated identifiers per query, best first."""

    items: Tensor  # (B, top_k) int64 row of the code table; -1 where fewer valid identifiers exist
    scores: Tensor  # (B, top_k) float32 sum of per-level log-probabilities; -inf where items == -1
    codes: Tensor  # (B, top_k, L) int64 generated codes; -1 where items == -1


class LevelState(NamedTuple):
    """What one level of the search saw and chose (passed to the ``on_level`` hook)."""

    level: int
    prefixes: Tensor  # (B, W, level) codes of the beams entering this level
    prefix_scores: Tensor  # (B, W) their log-probabilities (-inf = a dead beam)
    log_probs: Tensor  # (B, W, K) log p(code | prefix, query), before the prefix constraint
    allowed: Tensor | None  # (B, W, K) bool: the prefix index's valid next codes (None: unconstrained)
    parents: Tensor  # (B, W') beam each kept candidate extends, best first
    codes: Tensor  # (B, W') the code it appends
    scores: Tensor  # (B, W') the kept candidates' log-probabilities

    @property
    def removed(self) -> Tensor:
        """(B, W, K) bool: candidates of live beams that the prefix constraint removed."""
        live = torch.isfinite(self.prefix_scores)[:, :, None]
        if self.allowed is None:
            return torch.zeros_like(self.log_probs, dtype=torch.bool)
        return live & ~self.allowed


class _LayerWeights(NamedTuple):
    ln_self: tuple
    qkv: tuple[Tensor, Tensor]
    self_out: tuple[Tensor, Tensor]
    ln_cross: tuple
    q: tuple[Tensor, Tensor]  # fused query projection of every cross-attention of the layer
    n_first: int  # heads of the first branch (coarse or last-layer) in the fused queries; 0 = none
    first_out: tuple[Tensor, Tensor] | None
    gate: tuple[Tensor, Tensor] | None  # coarse branch's self-gate
    fine_out: tuple[Tensor, Tensor] | None  # α-mixed output projection of the fine branch
    ln_ff: tuple
    ff1: tuple[Tensor, Tensor]
    ff2: tuple[Tensor, Tensor]


def _ln(m) -> tuple:
    return (m.normalized_shape, m.weight, m.bias, m.eps)


def _lin(m) -> tuple[Tensor, Tensor]:
    return (m.weight, m.bias)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Softmax attention by two batched matmuls; ``q (..., Tq, Dh)``, ``k, v (..., T, Dh)``."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    return torch.matmul(torch.softmax(s, -1, dtype=torch.float32).to(v.dtype), v)


class BeamDecoder:
    """Constrained beam search over a :class:`CartModel`'s identifiers (CART, Fang et al., ACL 2025:
    constrained decoding over the identifier prefix tree).

    Holds the model's decoder weights, a few of them re-laid out (copies): build it after the
    weights are final, with the model in eval mode; :func:`decoder_for` rebuilds it when they change.
    """

    PACK_BELOW = 0.9  # pack the encoder-side keys/values when real tokens fill less than this share

    def __init__(self, model: CartModel) -> None:
        if model.training:
            raise ValueError("beam search needs the model in eval mode (model.eval())")
        self.model = model
        self.n_heads = model.n_heads
        d = model.d_model
        layers = []
        with torch.no_grad():
            for layer in model.layers:
                fu = layer.fusion
                qw, qb = [], []
                first_out = gate = fine_out = None
                n_first = 0
                first = fu.last_attn if fu.last_attn is not None else fu.coarse_attn
                if first is not None:
                    qw.append(first.q_proj.weight)
                    qb.append(first.q_proj.bias)
                    first_out, n_first = _lin(first.out_proj), self.n_heads
                    if fu.coarse_gate is not None and first is fu.coarse_attn:
                        gate = _lin(fu.coarse_gate)
                if fu.fine is not None:
                    s = fu.fine.n_layers
                    qw.append(fu.fine.q_weight.reshape(s * d, d))
                    qb.append(fu.fine.q_bias.reshape(s * d))
                    alpha = fu.fine.alpha()  # (S, D)
                    fine_out = ((alpha[:, :, None] * fu.fine.o_weight).permute(1, 0, 2).reshape(d, s * d).contiguous(),
                                (alpha * fu.fine.o_bias).sum(0))
                layers.append(_LayerWeights(
                    ln_self=_ln(layer.ln_self), qkv=_lin(layer.self_attn.qkv), self_out=_lin(layer.self_attn.out_proj),
                    ln_cross=_ln(layer.ln_cross), q=(torch.cat(qw).contiguous(), torch.cat(qb).contiguous()),
                    n_first=n_first, first_out=first_out, gate=gate, fine_out=fine_out, ln_ff=_ln(layer.ln_ff),
                    ff1=_lin(layer.ff[0]), ff2=_lin(layer.ff[2])))
        self.layers = tuple(layers)
        self.ln_f = _ln(model.ln_f)

    # ------------------------------------------------------------------ encoder side
    def memory(self, encoded: EncoderStates) -> tuple[tuple, Tensor]:
        """Encoder-side keys/values per layer ``(first branch KV | None, fine KV | None)`` and the
        additive mask ``(B, 1, 1, T)`` (0 = token, -inf = padding).

        A batch pads every query to its longest, and the keys/values of padding are masked out
        anyway; when real tokens fill less than :attr:`PACK_BELOW` of the batch, they are computed
        for the real tokens only and scattered into zeros, which the mask hides the same way. With
        caption-like queries this roughly halves the encoder-side cost at batch 100."""
        mask = encoded.mask.bool()
        bias = torch.zeros(mask.shape, dtype=encoded.layers.dtype, device=mask.device).masked_fill(~mask, -math.inf)
        s, b, t, de = encoded.layers.shape
        real = mask.reshape(-1).nonzero().squeeze(1)  # (M,) one host sync per search, outside the level loop
        if real.numel() >= self.PACK_BELOW * b * t:
            mem = self.model.memory(encoded)
            kv = tuple((m.last if m.last is not None else m.coarse, m.fine) for m in mem.layers)
            return kv, bias[:, None, None, :]
        packed = encoded.layers.reshape(s, b * t, de).index_select(1, real)  # (S, M, De)
        rows, cols = real // t, real % t  # each real token's query and position
        h = self.n_heads
        concat = None  # (M, S*De): the coarse branch's input, shared by the layers

        def spread(x: Tensor, heads: int) -> Tensor:
            """(G, M, D) rows of real tokens -> (B, G*heads, T, Dh), zeros at padding; written
            straight into the attention layout (one scatter, no zero-filled intermediate)."""
            g = x.shape[0]
            full = x.new_zeros(b, g, heads, t, x.shape[-1] // heads)
            full.permute(1, 0, 3, 2, 4)[:, rows, cols] = x.view(g, -1, heads, x.shape[-1] // heads)
            return full.view(b, g * heads, t, -1)

        kv = []
        for layer in self.model.layers:
            fu = layer.fusion
            first = fine = None
            if fu.coarse_attn is not None or fu.last_attn is not None:
                att = fu.coarse_attn if fu.coarse_attn is not None else fu.last_attn
                if fu.coarse_attn is not None and concat is None:
                    concat = packed.permute(1, 0, 2).reshape(-1, s * de)
                e = fu.coarse_proj(concat) if fu.coarse_attn is not None else packed[-1]
                first = KV(spread(att.k_proj(e)[None], h), spread(att.v_proj(e)[None], h))
            if fu.fine is not None:
                ex = fu.fine
                fine = KV(spread(torch.baddbmm(ex.k_bias[:, None, :], packed, ex.k_weight.transpose(1, 2)), h),
                          spread(torch.baddbmm(ex.v_bias[:, None, :], packed, ex.v_weight.transpose(1, 2)), h))
            kv.append((first, fine))
        return tuple(kv), bias[:, None, None, :]

    # ------------------------------------------------------------------ one level
    def step(self, kv: tuple, bias: Tensor, cache: list | None, tokens: Tensor, level: int) -> tuple[Tensor, list]:
        """One level for ``tokens (B, W)`` (BOS or the previous codes' tokens) -> logits ``(B, W, K_level)``
        and the self-attention cache ``[(k, v) (B*W, H, t, Dh)]`` per layer."""
        m = self.model
        b, w = tokens.shape
        h, d = self.n_heads, m.d_model
        dh = d // h
        scale = 1.0 / math.sqrt(dh)
        x = F.embedding(tokens, m.tok_emb.weight) + m.pos_emb.weight[level]  # (B, W, D)
        new_cache = []
        for i, (lw, (first, fine)) in enumerate(zip(self.layers, kv)):
            qkv = F.linear(F.layer_norm(x, *lw.ln_self), *lw.qkv).view(b * w, 3, h, 1, dh)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B*W, H, 1, Dh)
            if cache is not None:
                k, v = torch.cat((cache[i][0], k), 2), torch.cat((cache[i][1], v), 2)
            new_cache.append((k, v))
            att = v if k.shape[2] == 1 else _attend(q, k, v, None, scale)  # one position: softmax = 1
            x = x + F.linear(att.reshape(b, w, d), *lw.self_out)
            q = F.linear(F.layer_norm(x, *lw.ln_cross), *lw.q)  # (B, W, G*D)
            q = q.view(b, w, -1, dh).transpose(1, 2)  # (B, G heads, W, Dh): beams of a query share its memory
            out = None
            if lw.n_first:
                a = _attend(q[:, :lw.n_first], first.k, first.v, bias, scale).transpose(1, 2).reshape(b, w, d)
                out = F.linear(a, *lw.first_out)
                if lw.gate is not None:
                    out = torch.sigmoid(F.linear(out, *lw.gate)) * out
            if lw.fine_out is not None:
                a = _attend(q[:, lw.n_first:], fine.k, fine.v, bias, scale).transpose(1, 2).reshape(b, w, -1)
                f = F.linear(a, *lw.fine_out)
                out = f if out is None else out + f
            x = x + out
            x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, *lw.ln_ff), *lw.ff1)), *lw.ff2)
        lo = m.offsets[level]
        hi = lo + m.level_sizes[level]
        logits = F.linear(F.layer_norm(x, *self.ln_f), m.head.weight[lo:hi], m.head.bias[lo:hi])
        return logits, new_cache

    # ------------------------------------------------------------------ the search
    def search(self, encoded: EncoderStates, prefix_index: PrefixIndex | None, *, beam: int, top_k: int,
               on_level: Callable[[LevelState], None] | None = None) -> GenerationOutput:
        """Beam search over B queries' ``encoded`` states, constrained by ``prefix_index`` (None:
        unconstrained, ``items`` all -1). ``top_k <= beam`` identifiers are returned; with
        ``beam >= N`` the result is the exact ranking of all N valid identifiers. ``on_level``, if
        given, receives a :class:`LevelState` after every level (e.g. to draw the search)."""
        model = self.model
        constrained = prefix_index is not None
        n_valid = prefix_index.n_items if constrained else math.prod(model.level_sizes)
        _check(encoded, beam=beam, top_k=top_k, n_valid=n_valid)
        if constrained:
            if tuple(prefix_index.level_sizes) != tuple(model.level_sizes):
                raise ValueError(f"prefix index level sizes {prefix_index.level_sizes} != model's {model.level_sizes}")
            if prefix_index.device != encoded.layers.device:
                raise ValueError(f"prefix index is on {prefix_index.device}, encoder states on "
                                 f"{encoded.layers.device}: move the index once with index.to(device)")
        b = encoded.mask.shape[0]
        device = encoded.layers.device
        depth = model.depth
        with torch.inference_mode():
            kv, bias = self.memory(encoded)  # encoder-side K/V, once per query
            scores = torch.zeros(b, 1, device=device)  # (B, W): one live beam per query at level 0
            codes = torch.zeros(b, 1, 0, dtype=torch.long, device=device)  # (B, W, l)
            states = prefix_index.root(b)[:, None] if constrained else None  # (B, W) prefix-tree nodes
            rows_base = torch.arange(b, device=device)[:, None]
            tokens = torch.full((b, 1), BOS, dtype=torch.long, device=device)
            cache = None
            for level in range(depth):
                k = model.level_sizes[level]
                logits, new_cache = self.step(kv, bias, cache, tokens, level)
                logp = torch.log_softmax(logits.float(), -1)  # (B, W, K)
                w = logp.shape[1]
                allowed = None
                masked = logp
                if constrained:
                    allowed = prefix_index.allowed(states.reshape(-1), level).view(b, w, k)
                    masked = logp.masked_fill(~allowed, -math.inf)  # after the softmax; dead beams: all -inf
                cand = (scores[:, :, None] + masked).view(b, w * k)
                w_new = min(beam, w * k)
                new_scores, flat = cand.topk(w_new, dim=1)  # (B, W'), best first
                parent = torch.div(flat, k, rounding_mode="floor")  # beam each candidate extends
                code = flat - parent * k  # (B, W')
                if on_level is not None:
                    on_level(LevelState(level, codes, scores, logp, allowed, parent, code, new_scores))
                scores = new_scores
                codes = torch.cat((codes.gather(1, parent[:, :, None].expand(-1, -1, level)), code[:, :, None]), 2)
                if constrained:
                    states = prefix_index.advance(states.gather(1, parent).reshape(-1), level,
                                                  code.reshape(-1)).view(b, w_new)
                if level + 1 < depth:  # the last step's cache is never read again
                    keep = (rows_base * w + parent).reshape(-1)
                    cache = [(ck.index_select(0, keep), cv.index_select(0, keep)) for ck, cv in new_cache]
                    tokens = code + model.offsets[level]
            scores, codes = scores[:, :top_k], codes[:, :top_k]
            alive = scores > -math.inf  # dead beams (fewer valid identifiers than beams)
            if constrained:
                items = prefix_index.item_index(states[:, :top_k].masked_fill(~alive, DEAD))
            else:
                items = torch.full_like(scores, DEAD, dtype=torch.long)
            codes = codes.masked_fill(~alive[:, :, None], DEAD)
        return GenerationOutput(items=items, scores=scores, codes=codes)


def _fingerprint(model: CartModel) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def decoder_for(model: CartModel) -> BeamDecoder:
    """The :class:`BeamDecoder` of ``model``, reused while its weights stay the same (a training
    step, ``load_state_dict`` or ``.to()`` bumps a parameter's version or moves it: rebuilt)."""
    if model.training:
        raise ValueError("beam search needs the model in eval mode (model.eval())")
    key = _fingerprint(model)
    hit = model.__dict__.get("_beam_decoder")  # kept on the model: freed with it
    if hit is None or hit[0] != key:
        hit = (key, BeamDecoder(model))
        model.__dict__["_beam_decoder"] = hit
    return hit[1]


def constrained_beam_search(
    model: CartModel, encoded: EncoderStates, prefix_index: PrefixIndex, *, beam: int, top_k: int,
    on_level: Callable[[LevelState], None] | None = None,
) -> GenerationOutput:
    """Beam search that only ever extends valid identifier prefixes (CART inference).

    ``encoded``: :meth:`CartModel.encode` of B queries (model in eval mode). ``beam``: beams kept
    per query; ``top_k <= beam``: how many identifiers to return. With ``beam >= N`` the result is
    the exact ranking of all N identifiers (no valid prefix is ever pruned). ``on_level``: see
    :meth:`BeamDecoder.search`.
    """
    if prefix_index is None:
        raise ValueError("constrained beam search needs a prefix index")
    return decoder_for(model).search(encoded, prefix_index, beam=beam, top_k=top_k, on_level=on_level)


def unconstrained_beam_search(
    model: CartModel,
    encoded: EncoderStates,
    *,
    beam: int,
    top_k: int,
    prefix_index: PrefixIndex | None = None,
) -> GenerationOutput:
    """The same beam search without the prefix constraint (the throughput floor of decoding).

    Generated identifiers may name no item; with ``prefix_index`` they are looked up after the
    search (``items`` -1 where invalid), without it ``items`` is all -1.
    """
    out = decoder_for(model).search(encoded, None, beam=beam, top_k=top_k)
    if prefix_index is None:
        return out
    b, k, depth = out.codes.shape
    with torch.inference_mode():
        items = prefix_index.lookup(out.codes.reshape(b * k, depth)).view(b, k)
    return out._replace(items=items)


def exhaustive_scores(model: CartModel, encoded: EncoderStates, codes: Tensor, *, chunk: int = 1024) -> Tensor:
    """Log-probability of every identifier ``codes (N, L)`` for every query, by teacher forcing.

    Returns ``(B, N)`` float32. The brute-force reference of beam search (cost O(B·N)).
    """
    if encoded.mask.shape[0] == 0:
        raise ValueError("no queries to score (empty batch)")
    codes = codes.to(encoded.layers.device).long()
    b = encoded.mask.shape[0]
    out = []
    with torch.inference_mode():
        memory = model.memory(encoded)
        for lo in range(0, codes.shape[0], chunk):
            c = codes[lo : lo + chunk]  # (n, L)
            grouped = c[None].expand(b, -1, -1)  # (B, n, L): every query scores every identifier
            logits = model.decode(encoded, grouped, memory).logits
            total = torch.zeros(grouped.shape[:2], device=codes.device)
            for l, z in enumerate(logits):
                logp = torch.log_softmax(z.float(), -1)  # (B, n, K_l)
                total = total + logp.gather(-1, grouped[..., l : l + 1]).squeeze(-1)
            out.append(total)
    return torch.cat(out, 1)


def _check(encoded: EncoderStates, *, beam: int, top_k: int, n_valid: int) -> None:
    if encoded.mask.shape[0] == 0:
        raise ValueError("no queries to decode (empty batch)")
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_k > beam:
        raise ValueError(f"top_k={top_k} exceeds beam={beam}: beam search keeps only `beam` identifiers")
    if top_k > n_valid:
        raise ValueError(f"top_k={top_k} exceeds the number of valid identifiers ({n_valid})")
