"""Vocabulary layout and round trips; health metrics against a hand count."""
import math

import numpy as np
import pytest

from cartlib.ids import Vocabulary, identifier_health

# ------------------------------------------------------------------------------ vocabulary

VOCAB = Vocabulary(level_sizes=(3, 4, 2))
CODES = np.array([[0, 0, 0], [2, 3, 1], [1, 2, 0]])


def test_layout_pad_bos_then_levels():
    assert (Vocabulary.PAD, Vocabulary.BOS) == (0, 1)
    assert VOCAB.offsets == (2, 5, 9)
    assert VOCAB.size == 11
    assert VOCAB.n_levels == 3
    assert VOCAB.level_slice(1) == slice(5, 9)
    ranges = [set(range(11)[VOCAB.level_slice(i)]) for i in range(3)]
    assert ranges[0] | ranges[1] | ranges[2] == set(range(2, 11))
    assert sum(len(r) for r in ranges) == 9  # disjoint


def test_tokens_round_trip():
    tokens = VOCAB.to_tokens(CODES)
    np.testing.assert_array_equal(tokens, [[2, 5, 9], [4, 8, 10], [3, 7, 9]])
    np.testing.assert_array_equal(VOCAB.to_codes(tokens), CODES)


@pytest.mark.parametrize("codes, message", [
    (np.zeros((2, 2), dtype=np.int64), r"shape \(N, L=3\).*got shape \(2, 2\)"),
    (np.array([[0, 4, 0]]), "code 4 at item 0, level 1 is outside \\[0, 4\\)"),
    (np.array([[0, 0, 0], [-1, 0, 0]]), "code -1 at item 1, level 0"),
    (np.array([[0.5, 0, 0]]), "integers"),
])
def test_codes_that_do_not_match_the_vocabulary_raise(codes, message):
    with pytest.raises(ValueError, match=message):
        VOCAB.to_tokens(codes)


def test_token_outside_its_level_raises():
    with pytest.raises(ValueError, match="token 5 at item 0, level 0 is outside.*\\[2, 5\\)"):
        VOCAB.to_codes(np.array([[5, 5, 9]]))
    with pytest.raises(ValueError, match="token 1 at item 0, level 2"):
        VOCAB.to_codes(np.array([[2, 5, 1]]))  # BOS is not a code


def test_bad_level_sizes_and_level_raise():
    with pytest.raises(ValueError, match="level_sizes\\[1\\] must be an int >= 1; got 0"):
        Vocabulary(level_sizes=(3, 0))
    with pytest.raises(ValueError, match="empty"):
        Vocabulary(level_sizes=())
    with pytest.raises(ValueError, match="level 3 out of range"):
        VOCAB.level_slice(3)


def test_fingerprint_identifies_the_table():
    fp = VOCAB.fingerprint(CODES)
    assert len(fp) == 64 and fp == VOCAB.fingerprint(CODES.astype(np.int32))
    other = CODES.copy()
    other[[0, 1]] = other[[1, 0]]  # same identifiers, different items
    assert VOCAB.fingerprint(other) != fp
    assert Vocabulary(level_sizes=(3, 4, 3)).fingerprint(CODES) != fp
    VOCAB.verify(CODES, fp)
    with pytest.raises(ValueError, match="identifier table mismatch"):
        VOCAB.verify(other, fp)


def test_dict_round_trip():
    d = VOCAB.to_dict()
    assert d == {"level_sizes": [3, 4, 2], "pad": 0, "bos": 1}
    assert Vocabulary.from_dict(d) == VOCAB
    with pytest.raises(ValueError, match="unknown Vocabulary key\\(s\\): \\['eos'\\]"):
        Vocabulary.from_dict({**d, "eos": 2})


# ------------------------------------------------------------------------------ health

def test_health_matches_a_hand_count():
    # prefix (k, v) + u; level sizes (3, 4, u: 3)
    codes = np.array([
        [0, 1, 0],
        [0, 1, 1],  # shares (0, 1) with item 0
        [0, 1, 2],  # and with items 0, 1
        [2, 3, 0],
        [2, 0, 0],
        [2, 0, 1],  # shares (2, 0) with item 4
    ])
    h = identifier_health(codes, (3, 4, 3), reconstruction_rel_error=0.25, fit_seconds=1.5)
    assert h["collision_rate"] == pytest.approx(5 / 6)  # all but item 3
    assert h["max_items_per_prefix"] == 3
    assert h["unique_token_p99"] == 2  # u = 0,1,2,0,0,1: 99% of items have u <= 2
    assert h["code_usage_l0"] == pytest.approx(2 / 3)  # codes 0 and 2 of 3
    assert h["code_usage_l1"] == pytest.approx(3 / 4)  # codes 0, 1, 3 of 4
    p0 = np.array([3, 3]) / 6
    p1 = np.array([2, 3, 1]) / 6
    assert h["perplexity_l0"] == pytest.approx(math.exp(-(p0 * np.log(p0)).sum()))  # = 2
    assert h["perplexity_l1"] == pytest.approx(math.exp(-(p1 * np.log(p1)).sum()))
    assert "code_usage_l2" not in h and "perplexity_l2" not in h  # u is not a codebook
    assert h["n_items"] == 6 and h["identifier_length"] == 3
    assert h["reconstruction_rel_error"] == 0.25 and h["fit_seconds"] == 1.5


def test_health_reports_every_level_size_and_u_is_the_largest_prefix_group():
    # nearest rule: (k, v) collide, u = 0, 1, 2, … over the items sharing the prefix, in row order
    codes = np.array([[0, 1, 0], [0, 1, 1], [2, 0, 0], [0, 1, 2], [1, 3, 0]])
    h = identifier_health(codes, (3, 4, 3))
    assert [h["level_size_l0"], h["level_size_l1"], h["level_size_l2"]] == [3, 4, 3]
    assert h["level_size_l2"] == h["max_items_per_prefix"] == 3
    assert h["collision_rate"] == pytest.approx(3 / 5) and h["unique_token_p99"] == 2
    atomic = identifier_health(np.arange(4)[:, None], (4,), has_unique_token=False)
    assert atomic["level_size_l0"] == 4 and "level_size_l1" not in atomic


def test_health_percentile_on_many_items():
    u = np.zeros(200, dtype=np.int64)
    u[-2:] = 7  # 1% of items have u = 7: the 99th percentile is still 0
    codes = np.column_stack([np.zeros(200, dtype=np.int64), u])
    assert identifier_health(codes, (1, 8))["unique_token_p99"] == 0
    u[-3] = 5  # now 1.5% have u > 0
    assert identifier_health(np.column_stack([codes[:, 0], u]), (1, 8))["unique_token_p99"] == 5


def test_health_without_unique_token_and_perfectly_spread():
    codes = np.arange(5)[:, None]  # atomic: 5 items, 5 tokens
    h = identifier_health(codes, (5,), has_unique_token=False)
    assert h["collision_rate"] == 0 and h["max_items_per_prefix"] == 1
    assert h["unique_token_p99"] == 0
    assert h["code_usage_l0"] == 1 and h["perplexity_l0"] == pytest.approx(5)
    assert "reconstruction_rel_error" not in h and "fit_seconds" not in h


def test_health_collapsed_codes():
    codes = np.column_stack([np.zeros(4, dtype=np.int64), np.arange(4)])
    h = identifier_health(codes, (16, 4))
    assert h["perplexity_l0"] == pytest.approx(1.0) and h["code_usage_l0"] == 1 / 16
    assert h["collision_rate"] == 1 and h["max_items_per_prefix"] == 4


@pytest.mark.parametrize("codes, sizes, message", [
    (np.zeros((3, 2), dtype=np.int64), (4, 4, 4), "shape"),
    (np.zeros((0, 2), dtype=np.int64), (4, 4), "empty"),
    (np.array([[5, 0]]), (4, 4), "code 5 at item 0, level 0"),
])
def test_health_rejects_mismatched_tables(codes, sizes, message):
    with pytest.raises(ValueError, match=message):
        identifier_health(codes, sizes)
