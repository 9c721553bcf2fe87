"""Did a training reach a plateau? One rule for the tuning (cartlib/tuning.py) and the report.

A training with validation and early stopping (cartlib/train.py) keeps its best validation epoch. It
reached a plateau when its validation R@1 stopped improving before its schedule ended: it stopped
early (``patience`` epochs in a row without a better one), or its best epoch lies at least
``patience`` epochs before its last. When the best is within ``patience`` epochs of the schedule's
end, the curve decides: if its last ``patience`` epochs raised the best validation R@1 by at most
``tolerance`` (:data:`FLAT_TOLERANCE`, 0.5 pt, the tuning's tie tolerance: about 12 of 2,500
validation queries) it levelled off as the learning rate decayed, a plateau within that tolerance;
otherwise it was still improving (best at the last allowed epoch: budget-limited) or is near a
plateau, not a proven one (best 1 to ``patience`` - 1 epochs before the end).
"""
from __future__ import annotations

from enum import Enum
from typing import Sequence

__all__ = ["FLAT_TOLERANCE", "Plateau", "PLATEAUS", "parse_curve", "plateau_state", "reached_plateau", "recent_gain"]

FLAT_TOLERANCE = 0.005


class Plateau(str, Enum):
    STOPPED_EARLY = "stopped early"  # patience epochs without a better validation R@1
    AT_END = "plateau at the schedule's end"  # the schedule ended >= patience epochs after the best
    FLAT = "levelled off"  # best within patience epochs of the end, but the last patience epochs gained <= tolerance
    NEAR = "near a plateau"  # the schedule ended < patience epochs after the best, and it gained more
    STILL_IMPROVING = "still improving"  # best at the last allowed epoch and still gaining: budget-limited

    def __str__(self) -> str:
        return self.value


PLATEAUS = (Plateau.STOPPED_EARLY, Plateau.AT_END, Plateau.FLAT)  # the states that count as converged


def parse_curve(text: object) -> list[float] | None:
    """Validation R@1 per epoch from its space-separated form (``"0.1240 0.3220 …"``); None when absent."""
    if not isinstance(text, str) or not text.strip():
        return None
    return [float(v) for v in text.split()]


def recent_gain(curve: Sequence[float], patience: int) -> float | None:
    """How much the last ``patience`` epochs raised the best validation R@1 (0 if they did not);
    None when the curve is no longer than that."""
    k = max(patience, 1)
    if len(curve) <= k:
        return None
    return max(curve) - max(curve[:-k])


def plateau_state(*, epochs_trained: int, best_epoch: int, max_epochs: int, patience: int,
                  curve: Sequence[float] | None = None, tolerance: float = FLAT_TOLERANCE) -> Plateau:
    """Where a training ended relative to its validation plateau (see the module's docstring).
    ``curve``: validation R@1 after each epoch (without it, no training counts as :attr:`Plateau.FLAT`)."""
    if not 1 <= best_epoch <= epochs_trained <= max_epochs:
        raise ValueError(f"need 1 <= best_epoch <= epochs_trained <= max_epochs, got best_epoch={best_epoch}, "
                         f"epochs_trained={epochs_trained}, max_epochs={max_epochs}")
    if curve is not None and len(curve) != epochs_trained:
        raise ValueError(f"the validation curve has {len(curve)} epochs, the training {epochs_trained}")
    if best_epoch < epochs_trained and patience > 0 and epochs_trained < max_epochs:
        return Plateau.STOPPED_EARLY
    if epochs_trained - best_epoch >= max(patience, 1):
        return Plateau.AT_END
    gain = None if curve is None else recent_gain(curve, patience)
    if gain is not None and gain <= tolerance + 1e-12:
        return Plateau.FLAT
    return Plateau.STILL_IMPROVING if best_epoch == epochs_trained else Plateau.NEAR


def reached_plateau(*, epochs_trained: int, best_epoch: int, max_epochs: int, patience: int,
                    curve: Sequence[float] | None = None, tolerance: float = FLAT_TOLERANCE) -> bool:
    """Whether the training's validation R@1 stopped improving (within ``tolerance``) before its schedule ended."""
    return plateau_state(epochs_trained=epochs_trained, best_epoch=best_epoch, max_epochs=max_epochs,
                         patience=patience, curve=curve, tolerance=tolerance) in PLATEAUS
