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

Precision (:class:`Precision`): the decoder's matmuls run in the decoder's compute dtype (fp32,
fp16 or bf16; by default the model's own dtype, so fp32 on a CPU is exact and unchanged); the
weights are cast once when the decoder is built (the model is not touched) and the encoder states
once per search. The softmaxes, the per-level log-probabilities and the accumulated beam scores are
float32 whatever the compute dtype, so scores of an fp16 search compare with an fp32 one.
:func:`default_precision` is the suite's choice: fp16 on CUDA, fp32 elsewhere.

Host syncs: the only one per search is in :meth:`BeamDecoder.memory` (counting the real encoder
tokens to decide on packing, before the level loop); the level loop itself has no ``.item()``,
no Python branch on a tensor value and no op with a data-dependent output shape
(``tests/test_decode.py`` checks this with a dispatch-level op recorder), so a GPU queues all
levels without waiting. ``compile_step`` wraps the per-level step in ``torch.compile`` (an option
that ``scripts/gpu_check.py`` measures on against off; not the default).
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cartlib.ids.prefix import DEAD, PrefixIndex
from cartlib.model.cart import BOS, CartModel, EncoderStates
from cartlib.model.fusion import KV

__all__ = [
    "Precision", "default_precision", "GenerationOutput", "LevelState", "BeamDecoder", "decoder_for",
    "constrained_beam_search", "unconstrained_beam_search", "exhaustive_scores",
]


class Precision(str, Enum):
    """Compute dtype of the decoder's matmuls (scores are accumulated in float32 in every case)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]

    @classmethod
    def of(cls, value: "Precision | str | torch.dtype") -> "Precision":
        """A :class:`Precision` from itself, its name (``"fp16"``) or a torch dtype."""
        if isinstance(value, torch.dtype):
            for p in cls:
                if p.dtype == value:
                    return p
            raise ValueError(f"no decoding precision for dtype {value}; choose one of {[p.value for p in cls]}")
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown decoding precision {value!r}; choose one of {[p.value for p in cls]}") from None


def default_precision(device: torch.device | str) -> Precision:
    """The suite's decoding precision on ``device``: fp16 on CUDA (tensor cores; scores stay float32),
    fp32 elsewhere (exact; CPU half-precision matmuls are not faster on most CPUs)."""
    return Precision.FP16 if torch.device(device).type == "cuda" else Precision.FP32


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


class _MemoryWeights(NamedTuple):
    """Encoder-side projections of one decoder layer's cross-attentions (compute dtype)."""

    coarse_proj: tuple[Tensor, Tensor] | None  # W_z, b_z of the coarse branch (None: no coarse branch)
    first_k: tuple[Tensor, Tensor] | None  # keys/values of the first branch (coarse or last-layer); None: none
    first_v: tuple[Tensor, Tensor] | None
    fine_k: tuple[Tensor, Tensor] | None  # (S, D, De), (S, D) stacked experts; None: no fine branch
    fine_v: tuple[Tensor, Tensor] | None


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


def _ln(m, dtype: torch.dtype) -> tuple:
    return (m.normalized_shape, m.weight.to(dtype), m.bias.to(dtype), m.eps)


def _lin(m, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return (m.weight.to(dtype), m.bias.to(dtype))


def _pair(w: Tensor, b: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return (w.to(dtype).contiguous(), b.to(dtype).contiguous())


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

    def __init__(self, model: CartModel, *, precision: Precision | str | torch.dtype | None = None,
                 compile_step: bool | Mapping[str, Any] = False) -> None:
        """``precision``: compute dtype of the decoder (default: the model's own dtype; see the
        module docstring). ``compile_step``: wrap :meth:`step` in ``torch.compile`` (True, or a dict
        of its keyword arguments, e.g. ``{"mode": "reduce-overhead"}``); off by default."""
        if model.training:
            raise ValueError("beam search needs the model in eval mode (model.eval())")
        self.model = model
        self.precision = Precision.of(model.head.weight.dtype if precision is None else precision)
        dt = self.dtype = self.precision.dtype
        self.n_heads = model.n_heads
        d = model.d_model
        layers, mem = [], []
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
                    first_out, n_first = _lin(first.out_proj, dt), self.n_heads
                    if fu.coarse_gate is not None and first is fu.coarse_attn:
                        gate = _lin(fu.coarse_gate, dt)
                if fu.fine is not None:
                    s = fu.fine.n_layers
                    qw.append(fu.fine.q_weight.reshape(s * d, d))
                    qb.append(fu.fine.q_bias.reshape(s * d))
                    alpha = fu.fine.alpha()  # (S, D), folded in the model's dtype, then cast
                    fine_out = _pair((alpha[:, :, None] * fu.fine.o_weight).permute(1, 0, 2).reshape(d, s * d),
                                     (alpha * fu.fine.o_bias).sum(0), dt)
                layers.append(_LayerWeights(
                    ln_self=_ln(layer.ln_self, dt), qkv=_lin(layer.self_attn.qkv, dt),
                    self_out=_lin(layer.self_attn.out_proj, dt), ln_cross=_ln(layer.ln_cross, dt),
                    q=_pair(torch.cat(qw), torch.cat(qb), dt), n_first=n_first, first_out=first_out, gate=gate,
                    fine_out=fine_out, ln_ff=_ln(layer.ln_ff, dt), ff1=_lin(layer.ff[0], dt),
                    ff2=_lin(layer.ff[2], dt)))
                mem.append(_MemoryWeights(
                    coarse_proj=_lin(fu.coarse_proj, dt) if fu.coarse_attn is not None else None,
                    first_k=_lin(first.k_proj, dt) if first is not None else None,
                    first_v=_lin(first.v_proj, dt) if first is not None else None,
                    fine_k=(fu.fine.k_weight.to(dt), fu.fine.k_bias.to(dt)) if fu.fine is not None else None,
                    fine_v=(fu.fine.v_weight.to(dt), fu.fine.v_bias.to(dt)) if fu.fine is not None else None))
            self.tok_emb = model.tok_emb.weight.to(dt)
            self.pos_emb = model.pos_emb.weight.to(dt)
            self.heads = tuple(_pair(model.head.weight[lo:lo + k], model.head.bias[lo:lo + k], dt)
                               for lo, k in zip(model.offsets, model.level_sizes))  # one slice per level
        self.layers = tuple(layers)
        self.mem_layers = tuple(mem)
        self.ln_f = _ln(model.ln_f, dt)
        self.compiled = bool(compile_step)
        if compile_step:
            opts = dict(compile_step) if isinstance(compile_step, Mapping) else {}
            self._step = torch.compile(self.step, **opts)
        else:
            self._step = self.step

    # ------------------------------------------------------------------ encoder side
    def memory(self, encoded: EncoderStates) -> tuple[tuple, Tensor]:
        """Encoder-side keys/values per layer ``(first branch KV | None, fine KV | None)`` and the
        additive mask ``(B, 1, 1, T)`` (0 = token, -inf = padding), in the compute dtype.

        A batch pads every query to its longest, and the keys/values of padding are masked out
        anyway; when real tokens fill less than :attr:`PACK_BELOW` of the batch, they are computed
        for the real tokens only and scattered into zeros, which the mask hides the same way. With
        caption-like queries this roughly halves the encoder-side cost at batch 100."""
        dt = self.dtype
        layers = encoded.layers.to(dt)  # (S, B, T, De); a no-op in the model's own dtype
        mask = encoded.mask.bool()
        bias = torch.zeros(mask.shape, dtype=dt, device=mask.device).masked_fill(~mask, -math.inf)
        s, b, t, de = layers.shape
        h = self.n_heads
        real = mask.reshape(-1).nonzero().squeeze(1)  # (M,) the one host sync per search, outside the level loop
        flat = layers.reshape(s, b * t, de)
        if real.numel() >= self.PACK_BELOW * b * t:  # every position: a plain re-layout
            rows = cols = None
            tokens = flat  # (S, B*T, De)
        else:
            rows, cols = real // t, real % t  # each real token's query and position
            tokens = flat.index_select(1, real)  # (S, M, De)

        def spread(x: Tensor) -> Tensor:
            """(G, M, D) projected tokens -> (B, G*H, T, Dh) attention layout (group-major heads),
            zeros at padding when packed (one scatter, no zero-filled intermediate)."""
            g, dh = x.shape[0], x.shape[-1] // h
            if rows is None:
                return x.view(g, b, t, h, dh).permute(1, 0, 3, 2, 4).reshape(b, g * h, t, dh)
            full = x.new_zeros(b, g, h, t, dh)
            full.permute(1, 0, 3, 2, 4)[:, rows, cols] = x.view(g, -1, h, dh)
            return full.view(b, g * h, t, dh)

        concat = None  # (M, S*De): the coarse branch's input, shared by the layers
        kv = []
        for mw in self.mem_layers:
            first = fine = None
            if mw.first_k is not None:
                if mw.coarse_proj is not None:
                    if concat is None:
                        concat = tokens.permute(1, 0, 2).reshape(-1, s * de)
                    e = F.linear(concat, *mw.coarse_proj)  # Z = W_z [E_1; …; E_S] + b_z
                else:
                    e = tokens[-1]  # w/o fusion: the last encoder layer
                first = KV(spread(F.linear(e, *mw.first_k)[None]), spread(F.linear(e, *mw.first_v)[None]))
            if mw.fine_k is not None:
                (kw, kb), (vw, vb) = mw.fine_k, mw.fine_v
                fine = KV(spread(torch.baddbmm(kb[:, None, :], tokens, kw.transpose(1, 2))),
                          spread(torch.baddbmm(vb[:, None, :], tokens, vw.transpose(1, 2))))
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
        x = F.embedding(tokens, self.tok_emb) + self.pos_emb[level]  # (B, W, D), compute dtype
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
        return F.linear(F.layer_norm(x, *self.ln_f), *self.heads[level]), new_cache

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
            if self.compiled and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # new search: the last one's CUDA-graph outputs may go
            # no host sync from here to the end: python ints and tensor ops only
            scores = torch.zeros(b, 1, device=device)  # (B, W) float32 in any precision; one live beam at level 0
            codes = torch.zeros(b, 1, 0, dtype=torch.long, device=device)  # (B, W, l)
            states = prefix_index.root(b)[:, None] if constrained else None  # (B, W) prefix-tree nodes
            rows_base = torch.arange(b, device=device)[:, None]
            tokens = torch.full((b, 1), BOS, dtype=torch.long, device=device)
            cache = None
            for level in range(depth):
                k = model.level_sizes[level]
                logits, new_cache = self._step(kv, bias, cache, tokens, level)
                logp = torch.log_softmax(logits.float(), -1)  # (B, W, K) float32
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


def decoder_for(model: CartModel, precision: Precision | str | torch.dtype | None = None) -> BeamDecoder:
    """The :class:`BeamDecoder` of ``model`` at ``precision`` (None: the model's dtype), reused while
    its weights stay the same (a training step, ``load_state_dict`` or ``.to()`` bumps a parameter's
    version or moves it: rebuilt)."""
    if model.training:
        raise ValueError("beam search needs the model in eval mode (model.eval())")
    prec = Precision.of(model.head.weight.dtype if precision is None else precision)
    key = _fingerprint(model)
    cache = model.__dict__.setdefault("_beam_decoders", {})  # kept on the model: freed with it
    hit = cache.get(prec)
    if hit is None or hit[0] != key:
        hit = (key, BeamDecoder(model, precision=prec))
        cache[prec] = hit
    return hit[1]


def constrained_beam_search(
    model: CartModel, encoded: EncoderStates, prefix_index: PrefixIndex, *, beam: int, top_k: int,
    on_level: Callable[[LevelState], None] | None = None,
    precision: Precision | str | torch.dtype | None = None,
) -> GenerationOutput:
    """Beam search that only ever extends valid identifier prefixes (CART inference).

    ``encoded``: :meth:`CartModel.encode` of B queries (model in eval mode). ``beam``: beams kept
    per query; ``top_k <= beam``: how many identifiers to return. With ``beam >= N`` the result is
    the exact ranking of all N identifiers (no valid prefix is ever pruned). ``on_level``: see
    :meth:`BeamDecoder.search`. ``precision``: the decoder's compute dtype (None: the model's;
    :func:`default_precision` gives the suite's choice for a device); scores are float32 always.
    """
    if prefix_index is None:
        raise ValueError("constrained beam search needs a prefix index")
    return decoder_for(model, precision).search(encoded, prefix_index, beam=beam, top_k=top_k, on_level=on_level)


def unconstrained_beam_search(
    model: CartModel,
    encoded: EncoderStates,
    *,
    beam: int,
    top_k: int,
    prefix_index: PrefixIndex | None = None,
    precision: Precision | str | torch.dtype | None = None,
) -> GenerationOutput:
    """The same beam search without the prefix constraint (the throughput floor of decoding).

    Generated identifiers may name no item; with ``prefix_index`` they are looked up after the
    search (``items`` -1 where invalid), without it ``items`` is all -1. ``precision``: as for
    :func:`constrained_beam_search`.
    """
    out = decoder_for(model, precision).search(encoded, None, beam=beam, top_k=top_k)
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
