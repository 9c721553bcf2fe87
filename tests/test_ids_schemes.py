"""Identifier schemes: unique identifiers, determinism, items added later, input errors."""
import numpy as np
import pytest

from cartlib.ids import (
    AtomicIdentifier, CartIdentifier, HierarchicalKMeansIdentifier, Scheme,
    build_identifier_model, unique_token,
)

# Tiny: 300 items, 16 dims, 8 clusters, 8-code levels, 3 epochs.
SMALL = dict(n_clusters=8, n_levels=2, codebook_size=8, latent_dim=8, hidden_dim=32, epochs=3,
             batch_size=64, seed=0)


def clustered(n=300, d=16, k=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 4
    x = centers[rng.integers(0, k, n)] + rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def x():
    return clustered()


@pytest.fixture(scope="module")
def fitted(x):
    return {s: build_identifier_model(s, **SMALL).fit(x) for s in Scheme}


def _all_unique(codes):
    return len(np.unique(codes, axis=0)) == len(codes)


# ------------------------------------------------------------------------------ unique token

def test_unique_token_hand_count():
    prefix = np.array([[0, 1], [2, 0], [0, 1], [0, 1], [2, 0], [1, 1]])
    np.testing.assert_array_equal(unique_token(prefix), [0, 0, 1, 2, 1, 0])


def test_unique_token_counts_after_seen_items():
    seen = np.array([[0, 1], [2, 0]])
    counts = np.array([3, 1])  # three items hold (0, 1), one holds (2, 0)
    new = np.array([[2, 0], [0, 1], [5, 5], [0, 1]])
    np.testing.assert_array_equal(
        unique_token(new, seen_prefixes=seen, seen_counts=counts), [1, 3, 0, 4])


# ------------------------------------------------------------------------------ every scheme

@pytest.mark.parametrize("scheme", list(Scheme))
def test_every_scheme_gives_unique_full_identifiers(fitted, x, scheme):
    m = fitted[scheme]
    codes = m.codes_
    assert codes.dtype == np.int64 and codes.shape[0] == len(x)
    assert _all_unique(codes)
    assert len(m.level_sizes_) == codes.shape[1]
    assert (codes >= 0).all() and (codes < np.array(m.level_sizes_)).all()
    if m.has_unique_token:
        assert m.level_sizes_[-1] == codes[:, -1].max() + 1
    assert 0.0 <= m.reconstruction_rel_error_ <= 1.5 and m.fit_seconds_ >= 0
    health = m.health()
    assert health["n_items"] == len(x) and health["identifier_length"] == codes.shape[1]


@pytest.mark.parametrize("scheme", list(Scheme))
def test_new_items_get_unique_token_after_existing(fitted, x, scheme):
    m = build_identifier_model(scheme, **SMALL).fit(x[:250])
    before = m.codes_.copy()
    new = m.transform(x[250:])
    np.testing.assert_array_equal(m.codes_, before)  # transform leaves the table alone
    assert _all_unique(np.concatenate([before, new]))
    np.testing.assert_array_equal(m.extend(x[250:]), new)
    assert m.codes_.shape[0] == 300 and _all_unique(m.codes_)
    assert (m.codes_ < np.array(m.level_sizes_)).all()
    # Re-encoding fitted items repeats their semantic prefix (the random control draws fresh
    # codes); the balanced last RQ level moves them to a free last code, else u counts on.
    again = m.transform(x[:5])
    assert _all_unique(np.concatenate([m.codes_, again]))
    if scheme in (Scheme.CART, Scheme.RQVAE_ONLY):
        np.testing.assert_array_equal(again[:, :-2], m.codes_[:5, :-2])
    elif m.has_unique_token and scheme is not Scheme.RANDOM:
        np.testing.assert_array_equal(again[:, :-1], m.codes_[:5, :-1])
        assert (again[:, -1] > m.codes_[:5, -1]).all()


@pytest.mark.parametrize("scheme", [Scheme.CART, Scheme.RQVAE_ONLY])
def test_nearest_last_level_repeats_the_prefix_of_fitted_items(x, scheme):
    m = build_identifier_model(scheme, **SMALL, last_level="nearest").fit(x)
    again = m.transform(x[:5])
    np.testing.assert_array_equal(again[:, :-1], m.codes_[:5, :-1])
    assert (again[:, -1] > m.codes_[:5, -1]).all()


def test_shapes_match_cart_for_the_ablations(fitted):
    # w/o K-Means, w/o RQ-VAE and the random control keep CART's identifier shape.
    for s in (Scheme.RQVAE_ONLY, Scheme.HIERARCHICAL_KMEANS, Scheme.RANDOM):
        assert fitted[s].codes_.shape == fitted[Scheme.CART].codes_.shape
        assert fitted[s].level_sizes_[:-1] == (8, 8, 8)
    assert fitted[Scheme.KMEANS_UNIQUE].codes_.shape == (300, 2)
    assert fitted[Scheme.ATOMIC].codes_.shape == (300, 1)


def test_atomic_is_a_permutation(fitted, x):
    m = fitted[Scheme.ATOMIC]
    np.testing.assert_array_equal(np.sort(m.codes_[:, 0]), np.arange(300))
    assert m.level_sizes_ == (300,) and not m.has_unique_token
    np.testing.assert_array_equal(m.transform(x[:2])[:, 0], [300, 301])


def test_cart_coarse_token_is_kmeans_and_fine_tokens_code_the_residual():
    # 32 true clusters, 4 K-Means clusters: the residual keeps structure for the RQ-VAE.
    x = clustered(k=32)
    m = CartIdentifier(**{**SMALL, "n_clusters": 4, "epochs": 20}).fit(x)
    k = m.codes_[:, 0]
    np.testing.assert_array_equal(k, m.labels_)
    residual = x - m.cluster_centers_[k]
    nearest = m.rqvae_.transform(residual)
    np.testing.assert_array_equal(nearest[:, :-1], m.codes_[:, 1:-2])
    # The balanced last level keeps the nearest code wherever the item is alone in its group.
    groups = np.unique(m.codes_[:, :-2], axis=0, return_inverse=True)[1].reshape(-1)
    alone = np.bincount(groups)[groups] == 1
    np.testing.assert_array_equal(nearest[alone, -1], m.codes_[alone, -2])
    # Centroid + decoded residual reconstructs clearly better than the centroid alone.
    centroid_err = np.linalg.norm(residual) / np.linalg.norm(x)
    assert m.reconstruction_rel_error_ < centroid_err - 0.05, (m.reconstruction_rel_error_,
                                                               centroid_err)


def test_hierarchical_levels_nest_and_small_nodes_are_exact(x):
    m = HierarchicalKMeansIdentifier(n_clusters=4, n_levels=2, codebook_size=8).fit(x)
    # Every level-1 node is a k-means split of its parent's items: children are per parent.
    assert set(m.nodes_) >= {(k,) for k in np.unique(m.codes_[:, 0]).tolist()}
    big = HierarchicalKMeansIdentifier(n_clusters=4, n_levels=2, codebook_size=64).fit(x)
    # 300 items / 4 clusters <= 64 children: each item is numbered directly, error 0, no u.
    assert big.reconstruction_rel_error_ == pytest.approx(0.0, abs=1e-6)
    assert (big.codes_[:, -1] == 0).all()


@pytest.mark.parametrize("scheme", [Scheme.CART, Scheme.RQVAE_ONLY, Scheme.RANDOM,
                                    Scheme.HIERARCHICAL_KMEANS, Scheme.ATOMIC])
def test_codes_deterministic_for_a_seed(fitted, x, scheme):
    again = build_identifier_model(scheme, **SMALL).fit(x)
    np.testing.assert_array_equal(again.codes_, fitted[scheme].codes_)


def test_factory_accepts_strings_and_rejects_unknown_schemes():
    assert isinstance(build_identifier_model("cart", **SMALL), CartIdentifier)
    assert isinstance(build_identifier_model("atomic"), AtomicIdentifier)
    with pytest.raises(ValueError, match="unknown identifier scheme 'grace'"):
        build_identifier_model("grace")


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("scheme", list(Scheme))
@pytest.mark.parametrize("bad, message", [
    (np.zeros((0, 4)), "empty"),
    (np.zeros(12), "2-D"),
    (np.full((20, 4), np.nan), "NaN/inf"),
    (np.array([[0.0, np.inf]] * 20), "NaN/inf"),
])
def test_bad_features_raise(scheme, bad, message):
    with pytest.raises(ValueError, match=message):
        build_identifier_model(scheme, n_clusters=2, codebook_size=2, epochs=1).fit(bad)


@pytest.mark.parametrize("scheme", [s for s in Scheme if s is not Scheme.ATOMIC])
def test_more_clusters_than_items_raises(scheme):
    model = build_identifier_model(scheme, n_clusters=9, codebook_size=4, epochs=1)
    with pytest.raises(ValueError, match="n_clusters=9 is larger than the number of items N=5"):
        model.fit(np.random.default_rng(0).standard_normal((5, 3)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(codebook_size=1), "codebook_size must be >= 2; got 1"),
    (dict(n_levels=0), "n_levels must be >= 1; got 0"),
    (dict(n_clusters=0), "n_clusters must be >= 1; got 0"),
    (dict(epochs=0), "epochs must be >= 1; got 0"),
])
@pytest.mark.parametrize("scheme", list(Scheme))
def test_bad_hyperparameters_raise_for_every_scheme(scheme, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_identifier_model(scheme, **kwargs)


def test_transform_before_fit_and_wrong_dim(fitted):
    with pytest.raises(RuntimeError, match="not fitted"):
        build_identifier_model(Scheme.KMEANS_UNIQUE, n_clusters=2).transform(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="D=3 dims; the model was fitted on D=16"):
        fitted[Scheme.CART].transform(np.zeros((2, 3)))
