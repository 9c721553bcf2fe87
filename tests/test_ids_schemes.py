"""Identifier schemes: unique identifiers, determinism, items added later, the last RQ level, input errors."""
import inspect
import math

import numpy as np
import pytest
import torch

from cartlib.config import IdentifiersConfig
from cartlib.ids import (
    AtomicIdentifier, CartIdentifier, HierarchicalKMeansIdentifier, LastLevel, RQVAEOnlyIdentifier, Scheme,
    build_identifier_model, unique_token,
)
from cartlib.ids.rqvae import balanced_last_codes, group_ids

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
    # codes) and u counts on (the default last level is the nearest code, as in params.yaml).
    again = m.transform(x[:5])
    assert _all_unique(np.concatenate([m.codes_, again]))
    if m.has_unique_token and scheme is not Scheme.RANDOM:
        np.testing.assert_array_equal(again[:, :-1], m.codes_[:5, :-1])
        assert (again[:, -1] > m.codes_[:5, -1]).all()


@pytest.mark.parametrize("scheme", [Scheme.CART, Scheme.RQVAE_ONLY])
def test_balanced_last_level_moves_refitted_items_to_a_free_last_code(x, scheme):
    m = build_identifier_model(scheme, **SMALL, last_level="balanced").fit(x)
    again = m.transform(x[:5])
    assert _all_unique(np.concatenate([m.codes_, again]))
    np.testing.assert_array_equal(again[:, :-2], m.codes_[:5, :-2])


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
    # The default (nearest) last level is the RQ-VAE's nearest code for every item.
    np.testing.assert_array_equal(nearest[:, -1], m.codes_[:, -2])
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


# ------------------------------------------------------------------------------ the last RQ level
# (issue 14 item 3) params.yaml `identifiers.last_level`: "nearest" (the paper: the nearest code at
# every level, u counts the items sharing (k, v_1..v_M)) or "balanced" (the last level by matching).

def _brute_force_latents(rq, features):
    """The RQ-VAE's latent of each item and its codebooks, in float64, for a brute-force oracle."""
    with torch.no_grad():
        inp = torch.from_numpy(((features - rq.mean_) / np.float32(rq.scale_)).astype(np.float32))
        z = rq.model_.eval().encode(inp).double().numpy()
    q = rq.model_.quantizer
    return z, [q.codebook(level).double().numpy() for level in range(len(q.codebook_sizes))]


def _assert_brute_force_nearest(z, codebooks, codes):
    """codes (N, M): at every level the code is the nearest codeword of what the levels before left."""
    residual = z.copy()
    for level, cb in enumerate(codebooks):
        d = ((residual[:, None, :] - cb[None]) ** 2).sum(-1)  # (N, K) by brute force
        chosen = d[np.arange(len(d)), codes[:, level]]
        best = d.min(1)
        far = np.flatnonzero(chosen > best + 1e-4 * (1.0 + best))  # float32 vs float64 ties aside
        assert far.size == 0, (f"level {level}: {far.size} items hold a non-nearest code, e.g. item {far[0]}: "
                               f"code {codes[far[0], level]} at {chosen[far[0]]:.4f}, nearest {best[far[0]]:.4f}")
        residual = residual - cb[codes[:, level]]


def _groups(prefix):
    rows = {}
    for row, key in enumerate(map(tuple, prefix.tolist())):
        rows.setdefault(key, []).append(row)
    return list(rows.values())


def test_last_level_defaults_are_params_yaml():
    # no hidden default that differs from params.yaml (test_config: the dataclass defaults are params.yaml's)
    want = IdentifiersConfig().last_level
    assert want == "nearest"
    for f in (CartIdentifier, RQVAEOnlyIdentifier, build_identifier_model):
        p = inspect.signature(f).parameters["last_level"]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default == want, f
    assert build_identifier_model("cart", **SMALL).last_level is LastLevel.NEAREST


@pytest.mark.parametrize("scheme", [Scheme.CART, Scheme.RQVAE_ONLY])
def test_default_fine_codes_are_the_brute_force_nearest_codeword(fitted, x, scheme):
    m = fitted[scheme]
    if scheme is Scheme.CART:
        fine, inp = m.codes_[:, 1:-1], x - m.cluster_centers_[m.codes_[:, 0]]
        np.testing.assert_array_equal(m.codes_[:, 0], ((x[:, None] - m.cluster_centers_[None]) ** 2).sum(-1).argmin(1))
    else:
        fine, inp = m.codes_[:, :-1], x
    z, codebooks = _brute_force_latents(m.rqvae_, inp)
    _assert_brute_force_nearest(z, codebooks, fine)
    # items added later follow the same rule
    new = m.transform(x[:40])
    sub = new[:, 1:-1] if scheme is Scheme.CART else new[:, :-1]
    _assert_brute_force_nearest(z[:40], codebooks, sub)


@pytest.mark.parametrize("scheme", [Scheme.CART, Scheme.RQVAE_ONLY])
def test_default_unique_token_counts_the_items_sharing_the_prefix(fitted, x, scheme):
    m = fitted[scheme]
    codes, n = m.codes_, len(x)
    assert _all_unique(codes)
    groups = _groups(codes[:, :-1])  # rows sharing (k, v_1..v_M), in row order
    for rows in groups:
        assert codes[rows, -1].tolist() == list(range(len(rows)))  # u = 0..n-1 by item row
    biggest = max(map(len, groups))
    assert biggest > 1, "prefixes collide on this data: u must separate them"
    assert m.level_sizes_[-1] == biggest  # the u level's size = max items per prefix
    h = m.health()
    assert h["collision_rate"] == pytest.approx(sum(len(r) for r in groups if len(r) > 1) / n)
    assert h["max_items_per_prefix"] == biggest
    assert h["unique_token_p99"] == np.sort(codes[:, -1])[math.ceil(0.99 * n) - 1]
    assert [h[f"level_size_l{i}"] for i in range(codes.shape[1])] == list(m.level_sizes_)


@pytest.mark.parametrize("scheme", [Scheme.CART, Scheme.RQVAE_ONLY])
def test_balanced_last_level_keeps_the_matching(x, scheme):
    m = build_identifier_model(scheme, **SMALL, last_level="balanced").fit(x)
    assert m.last_level is LastLevel.BALANCED
    head = m.codes_[:, :1] if scheme is Scheme.CART else m.codes_[:, :0]
    inp = x - m.cluster_centers_[m.codes_[:, 0]] if scheme is Scheme.CART else x
    enc = m.rqvae_.encode(inp)
    fine = m.codes_[:, head.shape[1]:-1]
    np.testing.assert_array_equal(fine[:, :-1], enc.codes[:, :-1])  # nearest before the last level
    expected = balanced_last_codes(group_ids(np.column_stack([head, enc.codes[:, :-1]])), enc.last_cost)
    np.testing.assert_array_equal(fine[:, -1], expected)
    for rows in _groups(m.codes_[:, :-2]):  # a group of at most K items takes distinct last codes
        if len(rows) <= SMALL["codebook_size"]:
            assert len(set(m.codes_[rows, -2].tolist())) == len(rows)
    nearest = build_identifier_model(scheme, **SMALL, last_level="nearest").fit(x)
    np.testing.assert_array_equal(nearest.codes_[:, :-2], m.codes_[:, :-2])  # same K-Means and RQ-VAE
    assert m.level_sizes_[-1] < nearest.level_sizes_[-1]


def test_bad_last_level_raises():
    with pytest.raises(ValueError, match="unknown last_level 'closest'"):
        build_identifier_model("cart", **SMALL, last_level="closest")


@pytest.mark.parametrize("last_level", ["nearest", "balanced"])
def test_throughput_galleries_follow_identifiers_last_level(x, last_level):
    from cartlib.bench import galleries

    cfg = IdentifiersConfig(n_clusters=8, n_levels=2, codebook_size=8, latent_dim=8, hidden_dim=32, epochs=3,
                            batch_size=64, last_level=last_level)
    model = galleries.fit_identifier_model(x, cfg, seed=0)
    assert model.last_level == last_level
    ref = build_identifier_model("cart", **SMALL, last_level=last_level).fit(x)
    np.testing.assert_array_equal(model.codes_, ref.codes_)  # what the identifiers stage builds
    codes, sizes = galleries.identify(model, x)
    np.testing.assert_array_equal(codes, model.codes_)
    assert sizes == model.level_sizes_
    if last_level == "nearest":  # a gallery holding every item twice: the copies share the prefix, u tells them apart
        codes, sizes = galleries.identify(model, np.concatenate([x, x]))
        np.testing.assert_array_equal(codes[300:, :-1], codes[:300, :-1])
        assert (codes[300:, -1] > codes[:300, -1]).all() and sizes[-1] == 2 * model.level_sizes_[-1]
        assert _all_unique(codes)


# ------------------------------------------------------------------------------ the stage, tiny

def _tiny_task(root, *, n_distinct=40, copies=3, d=16):
    """data/image/{dataset, features} of n_distinct × copies items; copies of one item have the same
    features, so their CART prefixes collide."""
    from cartlib.data.features import save_features
    from cartlib.data.schema import DatasetWriter

    n = n_distinct * copies
    w = DatasetWriter(root / "data" / "image" / "dataset", task="image", dataset="synthetic", n_items=n,
                      media_shape=None, media_dtype=None)
    w.add(item_ids=[f"i{i}" for i in range(n)], splits=["test" if i < n // 3 else "train" for i in range(n)],
          attributes=[{}] * n, captions=[[f"item {i} caption {j}" for j in range(2)] for i in range(n)],
          pseudo_captions=[[] for _ in range(n)], media_paths=[f"{i}.png" for i in range(n)])
    w.close(qrels_path=root / "data" / "image" / "qrels.tsv")
    items = np.tile(clustered(n_distinct, d, k=4, seed=1), (copies, 1))  # row i and i + n_distinct: the same
    caps = np.repeat(items, 2, 0)
    save_features(root / "data" / "image" / "features", items=items,
                  caption_ids=[f"i{i}-c{j}" for i in range(n) for j in range(2)], captions=caps, meta={})
    return n_distinct, copies


def test_identifiers_stage_reports_u_and_variants_rebuild_for_last_level(tmp_path, monkeypatch):
    import json

    from cartlib import tracking
    from cartlib.config import params_from_dict, with_overrides
    from cartlib.data import schema
    from cartlib.data.idstore import load_identifiers
    from cartlib.paths import task_paths
    from cartlib.stages import identifiers as stage
    from cartlib.stages.variant import _STRUCTURE, identifier_table

    monkeypatch.setattr(tracking, "log_run", lambda **kwargs: None)  # no MLflow in a unit test
    n_distinct, copies = _tiny_task(tmp_path)
    params = params_from_dict({"base": {"device": "cpu"},
                               "identifiers": {"n_clusters": 4, "codebook_size": 4, "latent_dim": 8, "hidden_dim": 16,
                                               "epochs": 2, "batch_size": 32, "compare": ["cart"]}})
    assert params.identifiers.last_level == "nearest"
    paths = task_paths(tmp_path, "image")
    res = stage.run(params, paths, progress=False)
    codes = res.codes["cart"]
    np.testing.assert_array_equal(codes[n_distinct:2 * n_distinct, :-1], codes[:n_distinct, :-1])  # copies collide
    metrics = json.loads((paths.results("identifiers") / "metrics.json").read_text())
    assert metrics["collision_rate"] == 1.0 and metrics["max_items_per_prefix"] >= copies
    assert metrics["level_size_l3"] == metrics["max_items_per_prefix"] == codes[:, -1].max() + 1 > 1
    assert metrics["unique_token_p99"] >= copies - 1
    assert metrics["level_sizes"].endswith(f"×{metrics['level_size_l3']}")
    stored = load_identifiers(paths.data / "identifiers", "cart")
    assert stored.meta["config"]["last_level"] == "nearest"

    # variant rows: last_level changes the table's structure, so a row that sets it builds its own
    assert "last_level" in _STRUCTURE
    dataset = schema.load_dataset(paths.dataset, verify_hashes=False)
    same = identifier_table(params, paths, dataset, progress=False)
    assert "built_by" not in same.meta  # the stage's table
    row = with_overrides(params, {"identifiers": {"last_level": "balanced"}}, where="row")
    balanced = identifier_table(row, paths, dataset, progress=False)
    assert balanced.meta["built_by"] == "variant" and balanced.meta["config"]["last_level"] == "balanced"
    # the matching spreads colliding items over the last level's codes: a smaller u level
    assert balanced.vocab.level_sizes[-1] < metrics["level_size_l3"]
    assert balanced.fingerprint != stored.fingerprint
