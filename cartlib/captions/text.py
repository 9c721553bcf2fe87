"""Word-level caption tokens: lower-cased words and punctuation, a vocabulary of the train captions only."""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_TOKEN = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*|[^\w\s]")  # words (with inner - or '), or one punctuation mark
_SPACE_BEFORE = re.compile(r" ([,.;:!?])")


def tokenize(text: str) -> list[str]:
    """'A small red circle, then…' → ['a', 'small', 'red', 'circle', ',', 'then', '…']."""
    return _TOKEN.findall(str(text).lower())


def detokenize(tokens: Sequence[str]) -> str:
    return _SPACE_BEFORE.sub(r"\1", " ".join(tokens))


class Vocabulary:
    """Specials first, then the words of the given (train) captions, sorted: the same captions give the same ids."""

    def __init__(self, *, words: Iterable[str]):
        self.words = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad, self.bos, self.eos, self.unk = (self.index[s] for s in SPECIALS)

    @classmethod
    def from_captions(cls, texts: Iterable[str]) -> "Vocabulary":
        counts = Counter(t for text in texts for t in tokenize(text))
        return cls(words=counts)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, texts: Sequence[str], *, max_length: int) -> np.ndarray:
        """(N, max_length + 2) int64: BOS, at most `max_length` tokens, EOS, then PAD."""
        out = np.full((len(texts), max_length + 2), self.pad, dtype=np.int64)
        for r, text in enumerate(texts):
            ids = [self.index.get(t, self.unk) for t in tokenize(text)][:max_length]
            out[r, :len(ids) + 2] = [self.bos, *ids, self.eos]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids after BOS → text, stopping at EOS (or PAD)."""
        words = []
        for i in ids:
            if i in (self.eos, self.pad):
                break
            if i != self.bos:
                words.append(self.words[i])
        return detokenize(words)
