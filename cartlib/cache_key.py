"""What identifies a set of trained CART weights, so that a cache of them (the `train` stage's resume
checkpoint, a reused `compare`/`ablations` variant model) is only ever loaded by a run that would
have produced the same weights.

A key has two parts:

- ``settings``: every setting and a digest of every input that determines the weights: the whole
  :class:`~cartlib.config.TrainConfig` (dropout and n_heads included), the seed, the identifier
  table (level sizes and fingerprint), the training texts and their target identifiers, and the
  validation set;
- ``code``: the fingerprint of the source that trains them, :func:`cartlib.codegraph.code_fingerprint`
  over :data:`TRAINING_CODE` and every `cartlib` module it imports, the same closure DVC tracks as
  the train stage's dependencies. An edit that keeps every parameter name still changes it.

Any difference makes the cache stale: it is ignored (never loaded), the run says why in one line
(:meth:`WeightsKey.stale_reason`), and it trains from scratch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from cartlib import codegraph

__all__ = ["TRAINING_CODE", "WeightsKey", "StaleCacheError", "weights_key", "run_key", "training_code_fingerprint"]

# the module whose import closure trains the weights (build_model, training_pairs, train_cart, the model)
TRAINING_CODE = ("cartlib.stages.train",)


class StaleCacheError(ValueError):
    """A cached model or checkpoint was produced by other settings or other code."""


def training_code_fingerprint() -> str:
    """Fingerprint of the training code as it is on disk now (looked up at call time, so tests can
    point it at an edited copy of the package)."""
    return codegraph.code_fingerprint(TRAINING_CODE)


class WeightsKey(NamedTuple):
    settings: dict  # JSON-normalised: every setting, and a sha256 of every input, that determines the weights
    code: str  # fingerprint of the training code

    @property
    def config_digest(self) -> str:
        """16 hex digits of ``settings`` alone (names a variant's cache file; stable across code edits)."""
        return _sha(_canonical(self.settings))

    @property
    def digest(self) -> str:
        """16 hex digits of settings and code together."""
        return _sha(f"{self.config_digest}:{self.code}")

    def as_dict(self) -> dict:
        """What a checkpoint stores (plain types)."""
        return {"settings": self.settings, "code": self.code}

    def stale_reason(self, stored: Mapping[str, Any] | None) -> str | None:
        """None when ``stored`` (an ``as_dict()`` saved with a cache) is this key; else why not, in one line."""
        if not isinstance(stored, Mapping) or "settings" not in stored or "code" not in stored:
            return "it carries no cache key (written by an older version of cartlib)"
        if stored["settings"] != self.settings:
            old, new = _flatten(stored["settings"]), _flatten(self.settings)
            diff = [f"{k}: {_short(old.get(k, '<absent>'))} -> {_short(new.get(k, '<absent>'))}"
                    for k in sorted(set(old) | set(new)) if old.get(k, _MISSING) != new.get(k, _MISSING)]
            more = f", and {len(diff) - 4} more" if len(diff) > 4 else ""
            return f"config differs ({'; '.join(diff[:4])}{more})"
        if stored["code"] != self.code:
            return (f"code differs (training code fingerprint {stored['code']} -> {self.code}: "
                    f"a source file of {', '.join(TRAINING_CODE)} or a cartlib module it imports was edited)")
        return None

    def check(self, stored: Mapping[str, Any] | None, *, what: str) -> None:
        """Raise :class:`StaleCacheError` naming ``what`` and the difference, if ``stored`` is not this key."""
        reason = self.stale_reason(stored)
        if reason is not None:
            raise StaleCacheError(f"{what} is stale: {reason}")


def weights_key(*, settings: Mapping[str, Any], texts: Sequence[str], targets: Any, val: Sequence | None = None,
                code: str | None = None) -> WeightsKey:
    """The key of weights trained with ``settings`` on ``texts`` → ``targets (Q, L)``, validated on
    ``val`` = ``(texts, items, prefix_index, codes)`` (a :class:`cartlib.train.ValidationSet`; the prefix
    index is built from ``codes``) or None. ``code``: the training code's fingerprint (default: as on disk)."""
    data = {"texts": _texts_digest(texts), "targets": _array_digest(targets),
            "val": None if val is None else {"texts": _texts_digest(val[0]), "items": _array_digest(val[1]),
                                             "codes": _array_digest(val[3])}}
    full = json.loads(_canonical({**settings, "data": data}))  # tuples → lists, as a stored key reads back
    return WeightsKey(full, training_code_fingerprint() if code is None else code)


def run_key(cfg: Any, *, seed: int, table: Any, texts: Sequence[str], targets: Any, val: Sequence | None = None) -> WeightsKey:
    """The key of one stage's training run (`train`, or a `compare`/`ablations` variant): the whole
    ``cfg`` (a TrainConfig), the seed and the identifier table (an IdentifierTable), then the data.
    (Typed loosely on purpose: codegraph counts even type-only imports as dependencies.)"""
    settings = {"train": dataclasses.asdict(cfg), "seed": int(seed),
                "identifiers": {"scheme": table.scheme, "level_sizes": [int(k) for k in table.vocab.level_sizes],
                                "fingerprint": table.fingerprint}}
    return weights_key(settings=settings, texts=texts, targets=targets, val=val)


# ------------------------------------------------------------------------------------ helpers
_MISSING = object()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256(str(len(texts)).encode())
    for t in texts:
        h.update(b"\0" + str(t).encode())
    return h.hexdigest()[:16]


def _array_digest(x: Any) -> str:
    a = np.ascontiguousarray(np.asarray(x.cpu() if hasattr(x, "cpu") else x), dtype=np.int64)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."
