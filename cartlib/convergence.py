"""Did a training reach a plateau? One rule for the tuning (cartlib/tuning.py) and the report.

A training with validation and early stopping (cartlib/train.py) keeps its best validation epoch. It
reached a plateau when its validation R@1 stopped improving before its schedule ended: it stopped
early (``patience`` epochs in a row without a better one), or its best epoch lies at least
``patience`` epochs before its last. A best epoch at the last allowed one means it was still
improving: the model is budget-limited. Between the two (the schedule ended fewer than ``patience``
epochs after the best) it is near a plateau, not a proven one.
"""
from __future__ import annotations

from enum import Enum

__all__ = ["Plateau", "plateau_state", "reached_plateau"]


class Plateau(str, Enum):
    STOPPED_EARLY = "stopped early"  # patience epochs without a better validation R@1
    AT_END = "plateau at the schedule's end"  # the schedule ended >= patience epochs after the best
    NEAR = "near a plateau"  # the schedule ended < patience epochs after the best
    STILL_IMPROVING = "still improving"  # best at the last allowed epoch: budget-limited

    def __str__(self) -> str:
        return self.value


def plateau_state(*, epochs_trained: int, best_epoch: int, max_epochs: int, patience: int) -> Plateau:
    """Where a training ended relative to its validation plateau (see the module's docstring)."""
    if not 1 <= best_epoch <= epochs_trained <= max_epochs:
        raise ValueError(f"need 1 <= best_epoch <= epochs_trained <= max_epochs, got best_epoch={best_epoch}, "
                         f"epochs_trained={epochs_trained}, max_epochs={max_epochs}")
    if best_epoch == epochs_trained:
        return Plateau.STILL_IMPROVING
    if patience > 0 and epochs_trained < max_epochs:
        return Plateau.STOPPED_EARLY
    return Plateau.AT_END if epochs_trained - best_epoch >= max(patience, 1) else Plateau.NEAR


def reached_plateau(*, epochs_trained: int, best_epoch: int, max_epochs: int, patience: int) -> bool:
    """Whether the training's validation R@1 stopped improving before its schedule ended."""
    return plateau_state(epochs_trained=epochs_trained, best_epoch=best_epoch, max_epochs=max_epochs,
                         patience=patience) in (Plateau.STOPPED_EARLY, Plateau.AT_END)
