"""Where a training ended relative to its validation plateau (cartlib/convergence.py), by hand."""
import pytest

from cartlib.convergence import Plateau, plateau_state, reached_plateau


@pytest.mark.parametrize("trained, best, max_epochs, patience, expected", [
    (12, 12, 12, 2, Plateau.STILL_IMPROVING),  # best at the last allowed epoch: budget-limited
    (8, 7, 8, 2, Plateau.NEAR),                # the schedule ended 1 epoch after the best, < the patience
    (8, 6, 8, 2, Plateau.AT_END),              # 2 epochs without a better one as the schedule ended
    (11, 9, 16, 2, Plateau.STOPPED_EARLY),     # stopped by the patience (the tuning's chosen schedule)
    (5, 4, 5, 0, Plateau.AT_END),              # no patience: any epoch after the best
    (5, 5, 5, 0, Plateau.STILL_IMPROVING),
    (6, 6, 16, 2, Plateau.STILL_IMPROVING),    # cut short while improving (a time-boxed run) is no plateau
])
def test_plateau_state_by_hand(trained, best, max_epochs, patience, expected):
    assert plateau_state(epochs_trained=trained, best_epoch=best, max_epochs=max_epochs, patience=patience) \
        is expected
    assert reached_plateau(epochs_trained=trained, best_epoch=best, max_epochs=max_epochs, patience=patience) \
        is (expected in (Plateau.STOPPED_EARLY, Plateau.AT_END))


@pytest.mark.parametrize("trained, best, max_epochs", [(4, 5, 8), (9, 3, 8), (3, 0, 8)])
def test_impossible_epochs_are_an_error_naming_them(trained, best, max_epochs):
    with pytest.raises(ValueError, match="best_epoch"):
        plateau_state(epochs_trained=trained, best_epoch=best, max_epochs=max_epochs, patience=2)
