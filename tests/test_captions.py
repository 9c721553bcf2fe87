"""The `captions` stage and its learned captioner (cartlib.captions): attribute parsing by hand count,
a captioner that learns a trivially learnable mapping, the nearest-train baseline, determinism, the
pseudo_captions.tsv reader, leakage, and the stage on tiny datasets (built-in and real fixtures)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from cartlib.captions import attributes as A
from cartlib.captions import io as cap_io
from cartlib.captions import learned
from cartlib.captions import model as M
from cartlib.captions.quality import bleu_4
from cartlib.config import params_from_dict
from cartlib.data import schema
from cartlib.data.features import save_features
from cartlib.data.schema import DataFormatError
from cartlib.paths import task_paths

from test_real_datasets import tiny_clap, tiny_clip  # noqa: F401  (fixtures of the real-dataset tests)
from test_real_pipeline import CASES, smoke_params

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(autouse=True)
def _no_mlflow(monkeypatch):
    """Tracking is not under test here (and a fresh MLflow store costs seconds to migrate)."""
    from cartlib import tracking

    monkeypatch.setattr(tracking, "log_run", lambda **kw: "no-mlflow")
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _obj(colour, shape, position="centre", size="small"):
    return {"colour": colour, "shape": shape, "position": position, "size": size}


# ----------------------------------------------------------------------------- attribute parser
def test_mentions_longest_match_and_non_attribute_phrases():
    text = "A big crimson star shape in the upper left corner, to the left of a ring on a grainy backdrop"
    assert A.mentions(text, "image") == [("size", "large"), ("colour", "red"), ("shape", "star"),
                                         ("position", "top-left"), ("shape", "ring"), ("background", "noise")]
    # audio: "over a low hum" is the ambience, not the pitch "low"; "falling whistle" is not the tone "whistle"
    assert A.mentions("a falling whistle, then a whistle over a low hum", "audio") == [
        ("kind", "chirp-down"), ("kind", "tone"), ("ambience", "hum")]
    assert A.mentions("a small red circle moving left quickly", "video") == [
        ("size", "small"), ("colour", "red"), ("shape", "circle"), ("motion", "left"), ("speed", "fast")]


def test_attribute_scores_hand_count():
    attrs = {"objects": [_obj("red", "circle", "top-left", "small"), _obj("blue", "star", "centre", "large")],
             "background": "stripes"}
    # item pairs: colour red/blue, shape circle/star, position top-left/centre, size small/large, background: 9
    assert len(A.item_pairs("image", attrs)) == 9
    captions = [[
        "a small red circle in the top left",  # 4 mentions, 4 true; states 4 of 9
        "a large green star on a dotted background",  # size large ✓ green ✗ star ✓ dots ✗: 2 of 4; states 2 of 9
        "a crimson circle and a red ball",  # red ✓ circle ✓ red ✓ circle ✓: 4 of 4 true; distinct pairs: 2 of 9
    ]]
    s = A.attribute_scores(captions, [attrs], task="image")
    assert (s.n_captions, s.n_mentions, s.n_true) == (3, 12, 10)
    assert s.accuracy == pytest.approx(10 / 12)
    assert s.recall == pytest.approx((4 / 9 + 2 / 9 + 2 / 9) / 3)


def test_bleu_uses_every_reference():
    refs = [["a small red circle", "a tiny red circle in the centre"], ["a blue square"]]
    assert bleu_4(["a tiny red circle in the centre", "a blue square"], refs) == pytest.approx(100.0)
    assert bleu_4(["a blue square", "a tiny red circle in the centre"], refs) < 10


# ----------------------------------------------------------------------------- the captioner
N_NUISANCE = 16


def _toy(rng, n, *, flip_of=None):
    """Item vector = [a, b, nuisance] (unit norm); the caption is "<colour> <shape>" with colour = sign(a)
    and shape = sign(b): learnable. `flip_of`: copies of those items with a and b negated, whose nearest
    item is then their source, with the other colour and shape (a near-duplicate, as in the benchmark)."""
    if flip_of is None:
        ab = rng.uniform(1.0, 1.5, size=(n, 2)) * rng.choice([-1.0, 1.0], size=(n, 2))
        raw = np.concatenate([ab, 1.5 * rng.normal(size=(n, N_NUISANCE))], axis=1)
    else:
        raw = flip_of[0].copy()
        raw[:, :2] *= -1
    vec = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    colour = np.where(raw[:, 0] > 0, "red", "blue")
    shape = np.where(raw[:, 1] > 0, "circle", "square")
    texts = [f"{c} {s}" for c, s in zip(colour, shape)]
    attrs = [{"objects": [_obj(c, s)], "background": "dots"} for c, s in zip(colour, shape)]
    return vec, texts, attrs, raw


TOY_CFG = SimpleNamespace(d_model=32, n_layers=1, n_heads=2, dropout=0.0, prefix_length=2, max_length=6, lr=0.01,
                          epochs=12, batch_size=16, decoding="sample", temperature=0.5)


def test_captioner_learns_a_learnable_mapping_and_beats_a_wrong_nearest_train_baseline():
    rng = np.random.default_rng(0)
    vec, texts, attrs, raw = _toy(rng, 64)
    trained = M.train_captioner(vectors=vec, texts=texts, cfg=TOY_CFG, seed=0, progress=False)
    assert trained.vocab.words[4:] == ["blue", "circle", "red", "square"]  # the train captions' words only
    fit = M.generate(trained, vec, n=2, decoding="sample", temperature=0.5, max_length=6, seed=0)
    assert A.attribute_scores(fit, attrs, task="image").accuracy > 0.95  # near-perfect on what it saw
    # new items: flipped copies of train items, so the nearest train item has the other colour and shape
    new_vec, _, new_attrs, _ = _toy(rng, 0, flip_of=(raw[:16],))
    items = pd.DataFrame({"item_id": [f"t{i}" for i in range(len(vec))] + [f"v{i}" for i in range(len(new_vec))],
                          "split": ["train"] * len(vec) + ["val"] * len(new_vec)})
    caps = pd.DataFrame({"item_id": items["item_id"][:len(vec)], "kind": "reference", "text": texts})
    base = learned.nearest_train_captions(items=items, captions=caps, vectors=np.concatenate([vec, new_vec]), n=2,
                                          rows=np.arange(len(vec), len(items)))
    assert A.attribute_scores(base, new_attrs, task="image").accuracy == 0.0  # wrong by construction
    mine = M.generate(trained, new_vec, n=2, decoding="sample", temperature=0.5, max_length=6, seed=0)
    assert A.attribute_scores(mine, new_attrs, task="image").accuracy > 0.8
    beams = M.generate(trained, new_vec, n=2, decoding="beam", temperature=1.0, max_length=6, seed=0)
    assert A.attribute_scores([b[:1] for b in beams], new_attrs, task="image").accuracy > 0.8  # the best beam


def test_training_keeps_the_epoch_with_the_lowest_validation_loss():
    """Early stopping on validation items: with validation pairs whose captions contradict the train
    ones, the validation loss rises as the model learns; the returned weights are the best epoch's."""
    import torch

    rng = np.random.default_rng(3)
    vec, texts, _, raw = _toy(rng, 64)
    val_vec, _, _, _ = _toy(rng, 0, flip_of=(raw[:16],))
    val_texts = texts[:16]  # the flipped items keep their source's caption: wrong for what the vector says
    trained = M.train_captioner(vectors=vec, texts=texts, cfg=TOY_CFG, seed=0, val_vectors=val_vec,
                                val_texts=val_texts, progress=False)
    losses = [h["val_loss"] for h in trained.history]
    best = int(np.argmin(losses))
    assert best < len(losses) - 1, losses  # the oracle setting: validation loss is not lowest at the end
    vy = torch.as_tensor(trained.vocab.encode(list(val_texts), max_length=TOY_CFG.max_length))
    kept = M.teacher_forced_loss(trained.model, torch.as_tensor(val_vec), vy, pad=trained.vocab.pad)
    assert kept == pytest.approx(losses[best], rel=1e-5)


def test_same_seed_same_captions_and_beams_are_distinct():
    rng = np.random.default_rng(1)
    vec, texts, _, _ = _toy(rng, 32)
    cfg = SimpleNamespace(**{**vars(TOY_CFG), "epochs": 2})
    runs = [M.train_captioner(vectors=vec, texts=texts, cfg=cfg, seed=3, progress=False) for _ in range(2)]
    draws = [M.generate(t, vec[:8], n=3, decoding="sample", temperature=1.5, max_length=6, seed=5) for t in runs]
    assert draws[0] == draws[1]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    beams = M.generate(runs[0], vec[:8], n=3, decoding="beam", temperature=1.0, max_length=6, seed=5)
    assert all(len(set(b)) == 3 and all(b) for b in beams)  # n distinct, non-empty beams per item


# ----------------------------------------------------------------------------- pseudo_captions.tsv
def test_reader_round_trip_and_rejects_bad_files(tmp_path):
    path = tmp_path / "pseudo_captions.tsv"
    good = pd.DataFrame({"caption_id": ["a#p0", "a#p1", "b#p0"], "item_id": ["a", "a", "b"],
                         "text": ["a red\tcircle", "a blue star", "a heart"]})
    cap_io.write_pseudo_captions(path, good, items=["a", "b"])
    back = cap_io.read_pseudo_captions(path, items=pd.DataFrame({"item_id": ["a", "b"]}))
    assert back["text"].tolist() == ["a red circle", "a blue star", "a heart"]  # the tab was collapsed
    assert cap_io.by_item(back) == {"a": ["a red circle", "a blue star"], "b": ["a heart"]}
    cases = [
        ("caption_id\titem_id\ttext\na#p0\ta\tfine\nz#p0\tz\tan orphan\n", r"line 3 \(caption_id 'z#p0'\).*item_id 'z'"),
        ("caption_id\titem_id\ttext\na#p0\ta\tfine\nb#p0\tb\t  \n", r"line 3 \(caption_id 'b#p0'\): empty caption text"),
        ("caption_id\titem_id\ttext\na#p0\ta\tx\na#p0\tb\ty\n", r"line 3.*duplicate caption_id"),
        ("caption_id\ttext\na#p0\tx\n", r"missing column\(s\) \['item_id'\]"),
    ]
    for content, pattern in cases:
        path.write_text(content)
        with pytest.raises(DataFormatError, match=str(path).replace(".", r"\.") + ".*" + pattern):
            cap_io.read_pseudo_captions(path, items=["a", "b"])
    with pytest.raises(DataFormatError, match="item_id 'q'"):  # the writer validates too
        cap_io.write_pseudo_captions(path, good.assign(item_id=["a", "a", "q"]), items=["a", "b"])


# ----------------------------------------------------------------------------- the stage, built-in layout
def write_toy_dataset(root: Path, task: str = "image", *, n_train: int = 48):
    """A synthetic-format dataset (the `_toy` items: train; flipped copies of train items: val and test)
    and its features folder, under `root`."""
    rng = np.random.default_rng(0)
    paths = task_paths(root, task)
    train = _toy(rng, n_train)
    val, test = _toy(rng, 0, flip_of=(train[3][:4],)), _toy(rng, 0, flip_of=(train[3][4:7],))
    ids, splits, caps, pseudo, attrs = [], [], [], [], []
    for split, (vec, texts, a, _) in (("test", test), ("val", val), ("train", train)):
        for t in texts:
            ids.append(f"{task}-{len(ids):07d}")
            splits.append(split)
            k = len(ids)  # the item number makes every reference caption unique: leakage is checked on texts
            caps.append([f"A {t} {k}", f"a {t} on a dotted background {k}", f"there is a {t} {k}"])
            pseudo.append([f"rule {len(ids)} {t}"])
        attrs += a
    w = schema.DatasetWriter(paths.dataset, task=task, dataset="synthetic", n_items=len(ids), media_shape=(2, 2, 3),
                             media_dtype="uint8")
    w.add(item_ids=ids, splits=splits, attributes=attrs, captions=caps, pseudo_captions=pseudo,
          media=np.zeros((len(ids), 2, 2, 3), np.uint8))
    w.close(qrels_path=paths.qrels, qrels_val_path=paths.qrels_val)
    ds = schema.load_dataset(paths.dataset)
    refs = ds.captions[ds.captions["kind"] == "reference"]
    vecs = np.concatenate([test[0], val[0], train[0]])
    save_features(paths.features, items=vecs, caption_ids=refs["caption_id"],
                  captions=rng.normal(size=(len(refs), vecs.shape[1])).astype(np.float32), meta={})
    return paths, ds


def stage_params(task: str, **captions):
    raw = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    raw["base"].update(scale="default", tasks=[task], device="cpu")
    raw["data"].update(n_pseudo=2)
    raw["captions"].update({"epochs": 12, "batch_size": 16, "lr": 0.01, "d_model": 32, "n_layers": 1, "n_heads": 2,
                            "dropout": 0.0, "prefix_length": 2, "max_length": 10, **captions})
    return params_from_dict(raw, source="test")


def test_stage_writes_pseudo_captions_and_metrics(tmp_path, monkeypatch):
    from cartlib.stages import captions as stage

    paths, ds = write_toy_dataset(tmp_path / "repo")
    seen = {}
    real_train = M.train_captioner

    def spy(**kw):  # leakage guard: record exactly what the captioner is trained on
        seen.update(kw)
        return real_train(**kw)

    monkeypatch.setattr(M, "train_captioner", spy)
    out = stage.run(stage_params("image", decoding="beam"), paths, progress=False)
    refs = ds.captions[ds.captions["kind"] == "reference"]
    held_out = set(refs.loc[~refs["item_id"].isin(ds.split_items("train")["item_id"]), "text"])
    assert held_out and not held_out & set(seen["texts"])  # no val/test reference caption is a training input
    assert set(seen["texts"]) == set(refs.loc[refs["item_id"].isin(ds.split_items("train")["item_id"]), "text"])
    assert set(seen["val_texts"]) == set(ds.queries("val")["text"])  # scored for the curve, never trained on

    back = cap_io.read_pseudo_captions(cap_io.pseudo_captions_path(paths), items=ds.items)
    assert out.source == "learned" and len(back) == 2 * len(ds.items)
    assert back["caption_id"].tolist()[:2] == [f"{ds.items['item_id'].iloc[0]}#p{j}" for j in range(2)]
    m = json.loads((paths.results("captions") / "metrics.json").read_text())
    assert m["n_val_items"] == 4 and m["n_test_items"] == 3 and m["learned_captioner"] == 1
    for key in ("bleu_4", "attribute_accuracy", "attribute_recall", "baseline_bleu_4", "baseline_attribute_accuracy",
                "baseline_attribute_recall", "test_attribute_accuracy", "final_val_loss"):
        assert key in m and np.isfinite(m[key]), key
    assert "captioner_seconds" not in m  # a measurement: timings.json
    # the toy is learnable and the baseline wrong by construction (val items are flipped train items)
    assert m["attribute_accuracy"] > m["baseline_attribute_accuracy"] and m["beats_baseline_attribute_accuracy"] == 1
    for name in ("examples.png", "examples.pdf", "history.tsv", "examples.tsv", "notes.tsv"):
        assert (paths.results("captions") / name).exists(), name
    assert "tied to the dual tower" in out.notes[0]


def test_rules_copies_the_datasets_pseudo_captions(tmp_path):
    from cartlib.stages import captions as stage

    paths, ds = write_toy_dataset(tmp_path / "repo", n_train=8)
    out = stage.run(stage_params("image", captioner="rules"), paths, progress=False)
    given = ds.captions.loc[ds.captions["kind"] == "pseudo", ["caption_id", "item_id", "text"]].reset_index(drop=True)
    assert out.source == "rules"
    pd.testing.assert_frame_equal(cap_io.read_pseudo_captions(cap_io.pseudo_captions_path(paths), items=ds.items),
                                  given)
    assert out.metrics["learned_captioner"] == 0 and out.history.empty


# ----------------------------------------------------------------------------- real-dataset fixtures
@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["flickr30k", "coco", "audiocaps", "clotho", "msrvtt", "msvd"])
def test_stage_on_real_fixture(dataset, tmp_path, request):
    from cartlib.stages import captions as stage
    from cartlib.stages import data as data_stage
    from cartlib.stages import features as features_stage

    make, task, encoder, model_fixture = CASES[dataset]
    root = make(tmp_path / dataset)
    params = smoke_params(task=task, dataset=dataset, root=root, encoder=encoder,
                          model_path=request.getfixturevalue(model_fixture))
    paths = task_paths(tmp_path / "repo", task)
    data_stage.run(params, paths, progress=False)
    features_stage.run(params, paths, progress=False)
    out = stage.run(params, paths, progress=False)
    ds = schema.load_dataset(paths.dataset)
    back = cap_io.read_pseudo_captions(cap_io.pseudo_captions_path(paths), items=ds.items)
    assert out.source == "learned"  # the fixtures bring no pseudo_captions.jsonl
    assert set(back["item_id"]) == set(ds.items["item_id"])  # every item, whatever its split
    assert len(back) == params.data.n_pseudo * len(ds.items)
    words = set(" ".join(ds.queries("train")["text"]).lower().replace(",", " ").replace(".", " ").split())
    assert set(" ".join(back["text"]).replace(",", " ").replace(".", " ").split()) <= words
    m = json.loads((paths.results("captions") / "metrics.json").read_text())
    assert m["n_val_items"] == len(ds.split_items("val"))
    assert "attribute_accuracy" not in m  # a real dataset has no ground-truth attributes
    if m["n_val_items"]:
        assert 0 <= m["bleu_4"] <= 100 and 0 <= m["baseline_bleu_4"] <= 100


@pytest.mark.slow
def test_users_pseudo_captions_override_the_learned_captioner(tmp_path, request):
    from cartlib.data import real
    from cartlib.stages import captions as stage
    from cartlib.stages import data as data_stage

    make, task, encoder, model_fixture = CASES["flickr30k"]
    root = make(tmp_path / "flickr30k")
    with open(root / real.PSEUDO_FILE, "w") as f:
        for p in sorted((root / "images").iterdir()):
            f.write(json.dumps({"media": f"images/{p.name}", "captions": [f"my caption of {p.stem}"]}) + "\n")
    params = smoke_params(task=task, dataset="flickr30k", root=root, encoder=encoder,
                          model_path=request.getfixturevalue(model_fixture))
    paths = task_paths(tmp_path / "repo", task)
    data_stage.run(params, paths, progress=False)  # no features: copying needs none
    out = stage.run(params, paths, progress=False)
    assert out.source == "user"
    assert sorted(out.pseudo["text"]) == sorted(f"my caption of {p.stem}" for p in (root / "images").iterdir())
