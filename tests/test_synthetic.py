"""The built-in synthetic benchmark: determinism, uniqueness, grammar coverage, captioner errors, media."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from cartlib.data import synthetic as S


def _collect(**kwargs) -> dict:
    """All chunks of one generate call, concatenated, plus the chunk lengths."""
    chunks = list(S.generate(**kwargs))
    return {
        "lengths": [len(c.item_ids) for c in chunks],
        "item_ids": [i for c in chunks for i in c.item_ids],
        "splits": [s for c in chunks for s in c.splits],
        "media": np.concatenate([c.media for c in chunks]),
        "attributes": [a for c in chunks for a in c.attributes],
        "captions": [x for c in chunks for x in c.captions],
        "pseudo": [x for c in chunks for x in c.pseudo_captions],
    }


def _digest(data: dict) -> str:
    h = hashlib.sha256(data["media"].tobytes())
    h.update(json.dumps([data["item_ids"], data["splits"], data["attributes"], data["captions"], data["pseudo"]],
                        sort_keys=True).encode())
    return h.hexdigest()


def _sampled(task: str, n: int, seed: int = 0) -> list[dict]:
    return [S.sample_attributes(task=task, rng=np.random.default_rng([seed, i])) for i in range(n)]


def _parts_key(task: str, attrs: dict) -> tuple:
    """Our own canonical form: image/video objects are a set, audio events a sequence."""
    parts = [json.dumps(p, sort_keys=True) for p in attrs[S.PART_KEY[task]]]
    return (tuple(parts) if S.ORDERED[task] else tuple(sorted(parts))), attrs[S.SCENE_FIELD[task][0]]


@pytest.mark.parametrize("task", S.TASKS)
def test_media_shapes_dtypes_and_ranges(task):
    data = _collect(task=task, n_train=7, n_test=5, seed=3, chunk_size=4)
    assert data["lengths"] == [4, 4, 4]
    media = data["media"]
    assert media.shape == (12, *S.media_shape(task)) and media.dtype == S.media_dtype(task)
    if task == "audio":
        assert media.shape[1] == S.SAMPLE_RATE
        x = media.astype(np.float32)
        assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
        assert (np.abs(x).max(axis=1) > 0.05).all()  # every clip has an audible event
    else:
        assert (media.reshape(len(media), -1).std(axis=1) > 5).all()
    if task == "video":  # every object moves, turns or changes size: first and last frames differ
        assert (np.abs(media[:, 0].astype(int) - media[:, -1].astype(int)).reshape(12, -1).max(axis=1) > 0).all()


@pytest.mark.parametrize("task", ["image", "video"])
def test_objects_are_visible_in_their_colour_and_size(task):
    data = _collect(task=task, n_train=0, n_test=150, seed=4)
    cell = S.IMAGE_SIZE // 3
    area: dict[str, list[int]] = {}
    for frames, attrs in zip(data["media"], data["attributes"]):
        picture = frames if task == "image" else frames[0]
        for obj in attrs["objects"]:
            region = picture
            if task == "image":
                row, col = divmod(S.POSITIONS.index(obj["position"]), 3)
                top, left = max(0, row * cell - 3), max(0, col * cell - 3)
                region = picture[top:(row + 1) * cell + 3, left:(col + 1) * cell + 3]
            near = np.abs(region.astype(int) - np.asarray(S.COLOURS[obj["colour"]])).max(axis=-1) <= 14
            assert near.sum() >= 12, (attrs, obj)
            if len(attrs["objects"]) == 1 and obj.get("motion") not in ("grow", "shrink"):
                area.setdefault(obj["size"], []).append(int(near.sum()))
    sizes = list(S.IMAGE_RADII if task == "image" else S.VIDEO_RADII)
    means = [np.mean(area[size]) for size in sizes]
    assert means == sorted(means) and means[0] * 2 < means[-1], dict(zip(sizes, means))


def test_ids_and_splits_put_test_items_first():
    data = _collect(task="image", n_train=4, n_test=3, seed=0, chunk_size=2)
    assert data["item_ids"] == [f"image-{i:07d}" for i in range(7)]
    assert data["splits"] == ["test"] * 3 + ["train"] * 4
    only_train = _collect(task="audio", n_train=2, n_test=0, seed=0)
    assert only_train["splits"] == ["train", "train"] and only_train["item_ids"][0] == "audio-0000000"


@pytest.mark.parametrize("task", S.TASKS)
def test_val_items_come_last_unique_and_leave_test_and_train_bytes_unchanged(task):
    kwargs = dict(task=task, n_train=9, n_test=5, seed=7)
    without = _collect(**kwargs, chunk_size=4)
    both = _collect(**kwargs, n_val=6, chunk_size=4)
    assert both["splits"] == ["test"] * 5 + ["train"] * 9 + ["val"] * 6
    assert both["item_ids"] == [f"{task}-{i:07d}" for i in range(20)]
    first = {k: (v[:14] if k != "lengths" else v) for k, v in both.items()}
    assert _digest(first) == _digest(without)  # the val items are appended: nothing before them moved
    keys = [S.attribute_key(task, a) for a in both["attributes"]]
    assert len(set(keys)) == len(keys)  # unique over all three splits
    statements = [s for c in S.generate(**kwargs, n_val=6) for s in c.statements]
    assert [len(s) for s in statements] == [len(c) for c in both["captions"]]


@pytest.mark.parametrize("task", S.TASKS)
def test_same_seed_same_bytes_whatever_the_chunk_size(task):
    kwargs = dict(task=task, n_train=17, n_test=6, seed=11, n_captions=5, n_pseudo=2)
    whole = _collect(**kwargs, chunk_size=1000)
    pieces = _collect(**kwargs, chunk_size=7)
    assert pieces["lengths"] == [7, 7, 7, 2]
    assert _digest(whole) == _digest(pieces) == _digest(_collect(**kwargs, chunk_size=1000))


@pytest.mark.parametrize("task", S.TASKS)
def test_different_seed_gives_different_items(task):
    a = _collect(task=task, n_train=5, n_test=5, seed=1)
    b = _collect(task=task, n_train=5, n_test=5, seed=2)
    assert _digest(a) != _digest(b)
    assert a["attributes"] != b["attributes"] and a["captions"] != b["captions"]
    assert not np.array_equal(a["media"], b["media"])


def test_attribute_combinations_are_unique_and_near_duplicates_exist():
    data = _collect(task="image", n_train=1500, n_test=500, seed=7)
    keys = [_parts_key("image", a) for a in data["attributes"]]
    assert len(set(keys)) == len(keys)
    assert len({S.attribute_key("image", a) for a in data["attributes"]}) == len(keys)
    # consecutive items that differ in exactly one attribute (one object, or the background)
    one_off = 0
    for (parts_a, scene_a), (parts_b, scene_b) in zip(keys, keys[1:]):
        a, b = set(parts_a), set(parts_b)
        one_off += (len(a) == len(b)) and ((len(a - b) == 1 and scene_a == scene_b) or (a == b and scene_a != scene_b))
    assert one_off / len(keys) > 0.6 * S.NEAR_DUPLICATE_RATE


def test_uniqueness_holds_when_the_space_is_nearly_full(monkeypatch):
    """Single-object images only: 8,640 combinations, so redraws happen often."""
    monkeypatch.setitem(S.N_PARTS_WEIGHTS, "image", (1.0,))
    assert S.n_combinations("image") == len(S.POSITIONS) * len(S.SHAPES) * len(S.COLOURS) * len(S.IMAGE_RADII) * len(
        S.BACKGROUNDS)
    limit = int(S.MAX_FILL * S.n_combinations("image"))
    attrs = [a for c in S.generate(task="image", n_train=limit, n_test=0, seed=0, n_captions=1, n_pseudo=0,
                                   chunk_size=4096) for a in c.attributes]
    assert len({_parts_key("image", a) for a in attrs}) == limit
    with pytest.raises(ValueError, match=str(limit + 1)):
        S.generate(task="image", n_train=limit + 1, n_test=0, seed=0)


@pytest.mark.parametrize("task", S.TASKS)
def test_attribute_key_is_exact(task):
    attrs = _sampled(task, 1500, seed=5)
    attrs += [S._mutate(task, a, np.random.default_rng(i)) for i, a in enumerate(attrs)]
    keys = {}
    for a in attrs:
        keys.setdefault(S.attribute_key(task, a), set()).add(_parts_key(task, a))
    assert all(len(v) == 1 for v in keys.values())  # no two different sets share a key


@pytest.mark.parametrize("task", S.TASKS)
def test_attribute_space_is_far_larger_than_a_million(task):
    counts = np.bincount([len(a[S.PART_KEY[task]]) for a in _sampled(task, 3000)], minlength=4)[1:]
    weights = np.asarray(S.N_PARTS_WEIGHTS[task])
    assert np.allclose(counts[:len(weights)] / 3000, weights / weights.sum(), atol=0.04)
    assert S.n_combinations(task) > 5_000_000


@pytest.mark.parametrize("task", S.TASKS)
def test_every_grammar_rule_is_reachable(task):
    rules = S.grammar_rules(task)
    assert any(r.startswith("template:") for r in rules) and any(r.startswith("syn:") for r in rules)
    used: set[str] = set()
    for i, attrs in enumerate(_sampled(task, 700)):
        for caption in S.caption_item(task=task, attributes=attrs, rng=np.random.default_rng([9, i]), n=5):
            assert set(caption.rules) <= rules, caption
            used |= set(caption.rules)
    assert not rules - used, sorted(rules - used)
    assert {f"template:{task}:{name}" for name in S.TEMPLATES[task]} <= used


def test_generate_uses_the_grammar_and_gives_n_captions():
    data = _collect(task="video", n_train=6, n_test=4, seed=0, n_captions=7, n_pseudo=3)
    assert all(len(c) == 7 and len(set(c)) == 7 for c in data["captions"])
    assert all(len(p) == 3 for p in data["pseudo"])
    assert all(len(p) == 0 for p in _collect(task="audio", n_train=3, n_test=0, seed=0, n_pseudo=0)["pseudo"])


@pytest.mark.parametrize("task", S.TASKS)
def test_captions_always_name_the_parts(task):
    """Shape and colour of every object (kind and pitch of every event) are in every caption."""
    synonyms = S.SYNONYMS
    for i, attrs in enumerate(_sampled(task, 150, seed=1)):
        for caption in S.caption_item(task=task, attributes=attrs, rng=np.random.default_rng(i), n=5):
            text = caption.text.lower()
            assert caption.text[0].isupper()
            for part in attrs[S.PART_KEY[task]]:
                if task == "audio":
                    names = [synonyms["kind"][part["kind"]],
                             synonyms["pitch"][part["pitch"]] + synonyms["pitch_post"][part["pitch"]]]
                else:
                    names = [synonyms["shape"][part["shape"]], synonyms["colour"][part["colour"]]]
                for options in names:
                    assert any(o in text for o in options), (text, part)


def test_captions_vary_in_wording_and_order():
    attrs = {"objects": [{"position": "top-left", "shape": "circle", "colour": "red", "size": "small"},
                         {"position": "bottom-right", "shape": "square", "colour": "blue", "size": "large"}],
             "background": "plain-dark"}
    texts = [c.text.lower() for seed in range(5)
             for c in S.caption_item(task="image", attributes=attrs, rng=np.random.default_rng(seed), n=40)]
    assert all(len(set(texts[i:i + 40])) == 40 for i in range(0, 200, 40))

    def first(t: str, words: tuple[str, ...]) -> int:
        return min(t.find(w) for w in words if w in t)

    blue_first = np.mean([first(t, ("blue", "cobalt")) < first(t, ("red", "crimson", "scarlet")) for t in texts])
    assert 0.12 < blue_first < 0.4  # the listing order is shuffled in SHUFFLE_RATE / 2 of the captions
    assert any("dark" in t or "black" in t for t in texts) and any(
        not any(w in t for w in ("dark", "black")) for t in texts)  # the background is sometimes left out


@pytest.mark.parametrize("task", S.TASKS)
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.75, 1.0])
def test_captioner_error_rate_matches_its_parameter(task, rate):
    mentions = dropped = confused = 0
    for i, attrs in enumerate(_sampled(task, 400, seed=2)):
        for p in S.pseudo_caption_item(task=task, attributes=attrs, rng=np.random.default_rng([3, i]), n=2,
                                       error_rate=rate):
            mentions, dropped, confused = mentions + p.n_mentions, dropped + p.n_dropped, confused + p.n_confused
            assert p.n_corrupted == p.n_dropped + p.n_confused <= p.n_mentions
    assert mentions > 3000
    assert abs((dropped + confused) / mentions - rate) < 0.03
    if 0 < rate:
        assert abs(dropped / (dropped + confused) - S.PSEUDO_DROP_SHARE) < 0.05


def test_captioner_plain_style_and_its_mistakes():
    attrs = {"objects": [{"position": "top-right", "shape": "circle", "colour": "orange", "size": "large"}],
             "background": "noise"}
    exact = S.pseudo_caption_item(task="image", attributes=attrs, rng=np.random.default_rng(0), n=3, error_rate=0.0)
    assert {p.text for p in exact} == {"a large orange circle in the top right on a noisy background"}
    assert all(p.n_mentions == 5 and p.n_corrupted == 0 for p in exact)
    wrong = S.pseudo_caption_item(task="image", attributes=attrs, rng=np.random.default_rng(0), n=20, error_rate=1.0)
    assert all(p.n_corrupted == 5 and p.text != exact[0].text for p in wrong)
    audio = {"events": [{"kind": "tone", "pitch": "high", "loudness": "loud", "rhythm": "short"},
                        {"kind": "buzz", "pitch": "low", "loudness": "quiet", "rhythm": "repeated"}],
             "ambience": "hum"}
    text = S.pseudo_caption_item(task="audio", attributes=audio, rng=np.random.default_rng(0), n=1, error_rate=0)[0]
    assert text.text == "a loud short high tone, then a quiet repeated low buzz over a low hum"
    video = {"objects": [{"shape": "star", "colour": "green", "size": "small", "motion": "spin-cw", "speed": "fast"}],
             "background": "stripes"}
    text = S.pseudo_caption_item(task="video", attributes=video, rng=np.random.default_rng(0), n=1, error_rate=0)[0]
    assert text.text == "a small green star spinning clockwise quickly on a striped background"


@pytest.mark.parametrize("kwargs, value", [
    (dict(task="text"), "'text'"),
    (dict(n_train=-1), "-1"),
    (dict(n_test=-5), "-5"),
    (dict(n_train=0, n_test=0), "n_train=0"),
    (dict(n_train=2.5), "2.5"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(captioner_error_rate=1.5), "1.5"),
    (dict(captioner_error_rate=-0.1), "-0.1"),
    (dict(captioner_error_rate=math.nan), "nan"),
    (dict(seed=-3), "-3"),
    (dict(n_captions=0), "n_captions"),
    (dict(n_pseudo=-1), "n_pseudo"),
    (dict(n_train=10**12), "1000000000002"),
])
def test_bad_arguments_raise_naming_the_value(kwargs, value):
    args = dict(task="image", n_train=3, n_test=2, seed=0) | kwargs
    with pytest.raises(ValueError, match=value.replace(".", r"\.").replace("+", r"\+")):
        S.generate(**args)  # raised at the call, before any chunk is requested


def test_media_helpers():
    assert S.media_shape("image") == (64, 64, 3) and S.media_dtype("image") == np.uint8
    assert S.media_shape("audio") == (16000,) and S.media_dtype("audio") == np.float16
    assert S.media_shape("video") == (8, 32, 32, 3) and S.media_dtype("video") == np.uint8
    with pytest.raises(ValueError, match="'speech'"):
        S.media_shape("speech")
