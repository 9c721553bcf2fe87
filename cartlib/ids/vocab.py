"""Token vocabulary of the identifier decoder: one disjoint token range per identifier level."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

_FINGERPRINT_TAG = b"cartlib.ids.vocab/v1"  # bump if the hashed layout ever changes


@dataclass(frozen=True, kw_only=True)
class Vocabulary:
    """Decoder vocabulary for identifiers `(k, v_1..v_M, u)`, one token range per level.

    CART, Fang et al., ACL 2025, identifier and constrained decoding: every level has its
    own tokens, so a token says both its level and its code, and the prefix tree never confuses
    `k = 3` with `v_1 = 3`.

    Layout (token ids):
        0                                   PAD
        1                                   BOS (the decoder's start token)
        2 .. 2+S0-1                         level 0 codes 0..S0-1   (offsets[0] = 2)
        2+S0 .. 2+S0+S1-1                   level 1 codes           (offsets[1] = 2+S0)
        …                                   one range per level, in order
    size = 2 + sum(level_sizes). token = offsets[level] + code.
    """

    level_sizes: tuple[int, ...]

    PAD = 0
    BOS = 1
    N_SPECIAL = 2

    def __post_init__(self) -> None:
        sizes = tuple(self.level_sizes)
        if not sizes:
            raise ValueError("level_sizes is empty: an identifier needs at least one level")
        for level, size in enumerate(sizes):
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"level_sizes[{level}] must be an int >= 1; got {size!r}")
        object.__setattr__(self, "level_sizes", tuple(int(s) for s in sizes))

    @property
    def n_levels(self) -> int:
        """L, the identifier length."""
        return len(self.level_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First token id of each level."""
        starts = self.N_SPECIAL + np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]])
        return tuple(int(s) for s in starts)

    @property
    def size(self) -> int:
        """Number of token ids, PAD and BOS included."""
        return self.N_SPECIAL + sum(self.level_sizes)

    def level_slice(self, level: int) -> slice:
        """Token ids of `level` as a slice (e.g. to mask decoder logits to one level)."""
        if not 0 <= level < self.n_levels:
            raise ValueError(f"level {level} out of range: the vocabulary has {self.n_levels} levels")
        start = self.offsets[level]
        return slice(start, start + self.level_sizes[level])

    def check_codes(self, codes: object) -> np.ndarray:
        """Return codes as (N, L) int64, or raise ValueError naming the level and bad value."""
        c = np.asarray(codes)
        if c.ndim != 2 or c.shape[1] != self.n_levels:
            raise ValueError(f"codes must have shape (N, L={self.n_levels}) for level_sizes "
                             f"{self.level_sizes}; got shape {c.shape}")
        if c.size and not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"codes must be integers; got dtype {c.dtype}")
        c = c.astype(np.int64, copy=False)
        if c.size:
            bad = (c < 0) | (c >= np.asarray(self.level_sizes))
            if bad.any():
                row, level = np.argwhere(bad)[0]
                raise ValueError(f"code {c[row, level]} at item {row}, level {level} is outside "
                                 f"[0, {self.level_sizes[level]}) (level size "
                                 f"{self.level_sizes[level]})")
        return c

    def to_tokens(self, codes: object) -> np.ndarray:
        """(N, L) codes -> (N, L) int64 token ids."""
        return self.check_codes(codes) + np.asarray(self.offsets, dtype=np.int64)

    def to_codes(self, tokens: object) -> np.ndarray:
        """(N, L) token ids -> (N, L) int64 codes; a token outside its level's range raises."""
        t = np.asarray(tokens)
        if t.ndim != 2 or t.shape[1] != self.n_levels:
            raise ValueError(f"tokens must have shape (N, L={self.n_levels}); got shape {t.shape}")
        codes = t.astype(np.int64) - np.asarray(self.offsets, dtype=np.int64)
        bad = (codes < 0) | (codes >= np.asarray(self.level_sizes))
        if bad.any():
            row, level = np.argwhere(bad)[0]
            sl = self.level_slice(int(level))
            raise ValueError(f"token {t[row, level]} at item {row}, level {level} is outside the "
                             f"level's range [{sl.start}, {sl.stop})")
        return codes

    def fingerprint(self, codes: object) -> str:
        """sha256 hex digest of the level sizes and the (N, L) code table.

        A model stores the fingerprint of the table it was trained on and refuses another one
        (see `verify`): same vocabulary size is not enough, the item -> identifier map must match.
        """
        c = np.ascontiguousarray(self.check_codes(codes), dtype="<i8")
        h = hashlib.sha256(_FINGERPRINT_TAG)
        h.update(np.asarray(self.level_sizes, dtype="<i8").tobytes())
        h.update(np.asarray(c.shape, dtype="<i8").tobytes())
        h.update(c.tobytes())
        return h.hexdigest()

    def verify(self, codes: object, fingerprint: str) -> None:
        """Raise ValueError if `codes` is not the table whose fingerprint is `fingerprint`."""
        actual = self.fingerprint(codes)
        if actual != fingerprint:
            raise ValueError(f"identifier table mismatch: fingerprint {actual[:12]}… differs from "
                             f"the expected {fingerprint[:12]}… (level_sizes {self.level_sizes})")

    def to_dict(self) -> dict[str, Any]:
        return {"level_sizes": list(self.level_sizes), "pad": self.PAD, "bos": self.BOS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Vocabulary":
        unknown = set(data) - {"level_sizes", "pad", "bos"}
        if unknown:
            raise ValueError(f"unknown Vocabulary key(s): {sorted(unknown)}")
        if "level_sizes" not in data:
            raise ValueError("Vocabulary dict lacks 'level_sizes'")
        if data.get("pad", cls.PAD) != cls.PAD or data.get("bos", cls.BOS) != cls.BOS:
            raise ValueError(f"Vocabulary dict has pad={data.get('pad')}, bos={data.get('bos')}; "
                             f"this layout needs pad={cls.PAD}, bos={cls.BOS}")
        return cls(level_sizes=tuple(data["level_sizes"]))
