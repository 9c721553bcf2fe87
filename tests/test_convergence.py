"""Where a training ended relative to its validation plateau (cartlib/convergence.py), by hand."""
import pytest

from cartlib.convergence import Plateau, parse_curve, plateau_state, reached_plateau, recent_gain


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


def test_the_curve_tells_a_levelled_off_end_from_a_still_rising_one():
    # the tuning's 12-epoch reference: +0.0056 in its last 2 epochs (> 0.005): still improving
    rising = [0.124, 0.322, 0.39, 0.4392, 0.4684, 0.488, 0.5044, 0.5076, 0.5172, 0.5256, 0.5284, 0.5312]
    assert recent_gain(rising, 2) == pytest.approx(0.0056)
    assert plateau_state(epochs_trained=12, best_epoch=12, max_epochs=12, patience=2, curve=rising) \
        is Plateau.STILL_IMPROVING
    flat = rising[:10] + [0.5276, 0.5296]  # +0.004 over the best 2 epochs before: levelled off
    assert plateau_state(epochs_trained=12, best_epoch=12, max_epochs=12, patience=2, curve=flat) is Plateau.FLAT
    assert reached_plateau(epochs_trained=12, best_epoch=12, max_epochs=12, patience=2, curve=flat)
    exact = rising[:10] + [0.5256, 0.5306]  # exactly the tolerance: flat
    assert plateau_state(epochs_trained=12, best_epoch=12, max_epochs=12, patience=2, curve=exact) is Plateau.FLAT
    near = rising[:10] + [0.5400, 0.5380]  # best 1 epoch before the end, +0.0144: near, not proven
    assert plateau_state(epochs_trained=12, best_epoch=11, max_epochs=12, patience=2, curve=near) is Plateau.NEAR
    # a curve of the patience's length or shorter cannot say
    assert recent_gain([0.1, 0.2], 2) is None
    assert plateau_state(epochs_trained=2, best_epoch=2, max_epochs=2, patience=2, curve=[0.1, 0.1005]) \
        is Plateau.STILL_IMPROVING


def test_curves_read_back_and_a_wrong_length_is_an_error():
    assert parse_curve("0.1240 0.3220") == [0.124, 0.322]
    assert parse_curve(None) is None and parse_curve(float("nan")) is None and parse_curve(" ") is None
    with pytest.raises(ValueError, match="3 epochs, the training 2"):
        plateau_state(epochs_trained=2, best_epoch=2, max_epochs=4, patience=2, curve=[0.1, 0.2, 0.3])


@pytest.mark.parametrize("trained, best, max_epochs", [(4, 5, 8), (9, 3, 8), (3, 0, 8)])
def test_impossible_epochs_are_an_error_naming_them(trained, best, max_epochs):
    with pytest.raises(ValueError, match="best_epoch"):
        plateau_state(epochs_trained=trained, best_epoch=best, max_epochs=max_epochs, patience=2)
