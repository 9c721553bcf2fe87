"""The throughput benchmark's queries: tokens for the CART encoder and the same queries' caption
features for the dual-tower systems, and the length-bucketed encoding of a batch."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from cartlib.model.cart import CartModel, EncoderStates

__all__ = ["QuerySet", "make_query_set", "encode_bucketed"]


class QuerySet(NamedTuple):
    """The benchmark's queries, ``n = max(batch sizes)`` of them: tokens for the encoder, the same
    queries' caption features for the dual-tower systems."""

    input_ids: Tensor  # (n, T) on the device
    attention_mask: Tensor  # (n, T) on the device
    vectors: np.ndarray  # (n, D) float32 unit rows (the same queries' features)

    def batch(self, size: int) -> tuple[Tensor, Tensor]:
        """Tokens of the first ``size`` queries, padded to their own longest."""
        mask = self.attention_mask[:size]
        t = max(int(mask.sum(1).max()), 1)
        return self.input_ids[:size, :t], mask[:size, :t]


def make_query_set(texts: Sequence[str] | None, vectors: np.ndarray, *, n: int, seed: int, tokenizer=None,
                   max_length: int = 48, device: str | torch.device = "cpu", token_ids: Tensor | None = None,
                   token_mask: Tensor | None = None) -> QuerySet:
    """``n`` queries drawn (seeded, cycling when fewer exist) from ``texts`` (tokenised with
    ``tokenizer``) and their ``vectors``; or from pre-tokenised ``token_ids``/``token_mask`` (one row
    per vector; no tokenizer needed)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(vectors) == 0:
        raise ValueError("no queries")
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(len(vectors)) for _ in range(-(-n // len(vectors)))])[:n]
    if token_ids is None:
        if tokenizer is None or texts is None:
            raise ValueError("need texts and a tokenizer, or token_ids and token_mask")
        enc = tokenizer([texts[i] for i in pick], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        if token_mask is None or len(token_ids) != len(vectors) or token_mask.shape != token_ids.shape:
            raise ValueError(f"token_ids and token_mask must have one row per vector ({len(vectors)})")
        ids, mask = token_ids[torch.as_tensor(pick)], token_mask[torch.as_tensor(pick)]
    return QuerySet(ids.to(device), mask.to(device), np.ascontiguousarray(vectors[pick]))


def encode_bucketed(model: CartModel, input_ids: Tensor, attention_mask: Tensor, *, bucket: int = 32) -> EncoderStates:
    """:meth:`CartModel.encode` of a batch sorted by length in buckets of ``bucket`` queries, each
    padded only to its own longest (what sentence-transformers does), reassembled in the batch's
    order and padded to its longest with zeros (masked, as padding always is). The outputs at real
    tokens are the same as one padded call's; queries of mixed lengths cost less."""
    b = input_ids.shape[0]
    lengths = attention_mask.sum(1)
    if b <= bucket:
        return model.encode(input_ids, attention_mask)
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    parts = []
    for lo in range(0, b, bucket):
        idx = order[lo:lo + bucket]
        t = max(int(sorted_lengths[min(lo + bucket, b) - 1]), 1)
        parts.append((idx, model.encode(input_ids[idx, :t], attention_mask[idx, :t]).layers))
    s, _, _, d = parts[0][1].shape
    layers = parts[0][1].new_zeros(s, b, attention_mask.shape[1], d)
    for idx, part in parts:
        layers[:, idx, :part.shape[2]] = part
    return EncoderStates(layers, attention_mask.bool())
