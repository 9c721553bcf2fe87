"""Identifiers `(k, v_1..v_M, u)` and the competing schemes, their vocabulary and health.

Names load lazily (PEP 562): `from cartlib.ids import Vocabulary` stays numpy-only, and torch and
scikit-learn are imported only by the modules that need them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "cartlib.ids.health": ["identifier_health"],
    "cartlib.ids.kmeans": ["KMeansFit", "KMeansQuantizer", "check_features", "fit_kmeans"],
    "cartlib.ids.rqvae": ["RQVAE", "Encoding", "EpochStats", "LastLevel", "RQVAEOutput",
                          "RQVAEQuantizer", "ResidualQuantizer"],
    "cartlib.ids.schemes": ["AtomicIdentifier", "CartIdentifier", "HierarchicalKMeansIdentifier",
                            "IdentifierModel", "KMeansUniqueIdentifier", "RandomIdentifier",
                            "RQVAEOnlyIdentifier", "Scheme", "build_identifier_model",
                            "unique_token"],
    "cartlib.ids.vocab": ["Vocabulary"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'cartlib.ids' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from cartlib.ids.health import identifier_health
    from cartlib.ids.kmeans import KMeansFit, KMeansQuantizer, check_features, fit_kmeans
    from cartlib.ids.rqvae import (
        RQVAE, Encoding, EpochStats, LastLevel, RQVAEOutput, RQVAEQuantizer, ResidualQuantizer,
    )
    from cartlib.ids.schemes import (
        AtomicIdentifier, CartIdentifier, HierarchicalKMeansIdentifier, IdentifierModel,
        KMeansUniqueIdentifier, RandomIdentifier, RQVAEOnlyIdentifier, Scheme,
        build_identifier_model, unique_token,
    )
    from cartlib.ids.vocab import Vocabulary
