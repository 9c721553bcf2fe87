"""Caches of trained weights are keyed by what produced them (issue 13 items 4, 10).

A resume checkpoint or a reused variant model is loaded only by a run with the same whole train
config, seed, identifier table, data and training code; otherwise it is ignored, the log says why,
and the run trains from scratch. Caption enhancement with no pseudo-captions stops before training.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cartlib import codegraph
from cartlib.captions.io import pseudo_captions_path, write_dataset_pseudo_captions
from cartlib.config import BaseConfig, Params, TrainConfig
from cartlib.data.idstore import load_identifiers, save_identifiers
from cartlib.data.schema import DatasetWriter, load_dataset
from cartlib.paths import task_paths
from cartlib.stages import train as train_stage
from cartlib.train import train_cart

from test_train import CODES, TEXTS, tiny_model, tokenizer

# a smoke-size decoder on the bundled (frozen) MiniLM: each stage run takes a second or two
TINY = TrainConfig(d_model=32, n_heads=4, n_layers=1, dropout=0.1, epochs=2, batch_size=8, lr=5e-3,
                   consistency_weight=0.5, max_length=16)
PARAMS = Params(base=BaseConfig(seed=0, device="cpu", tasks=("image",)))
SIZES = (3, 2, 2)


def tiny_repo(root: Path, *, pseudo: tuple[str, ...] = ("test", "train")):
    """data/image/{dataset,qrels.tsv,identifiers/cart.*} of 4 test + 6 train items; the items of the
    ``pseudo`` splits have a pseudo-caption."""
    paths = task_paths(root, "image")
    n_test, n = 4, 10
    w = DatasetWriter(paths.dataset, task="image", dataset="synthetic", n_items=n, media_shape=(2, 2, 3),
                      media_dtype="uint8")
    ids = [f"image-{i:07d}" for i in range(n)]
    colours = ["red", "blue", "green", "pink", "grey"]
    splits = ["test"] * n_test + ["train"] * (n - n_test)
    w.add(item_ids=ids, splits=splits, attributes=[{"i": i} for i in range(n)],
          captions=[[f"a {colours[i % 5]} shape number {i}", f"shape {i} that is {colours[i % 5]}"] for i in range(n)],
          pseudo_captions=[[f"maybe a {colours[i % 5]} thing {i}"] if splits[i] in pseudo else [] for i in range(n)],
          media=np.zeros((n, 2, 2, 3), np.uint8))
    w.close(qrels_path=paths.qrels)
    # what the `captions` stage writes (here: the dataset's own pseudo-captions, as `captioner: rules` does)
    write_dataset_pseudo_captions(load_dataset(paths.dataset), pseudo_captions_path(paths))
    codes = np.array([[i % 3, (i // 3) % 2, (i // 6) % 2] for i in range(n)])
    save_identifiers(paths.data / "identifiers", scheme="cart", codes=codes, item_ids=ids, level_sizes=SIZES,
                     has_unique_token=False, meta={"config": dataclasses.asdict(PARAMS.identifiers)})
    return paths


@pytest.fixture
def epochs_run(monkeypatch) -> list[int]:
    """The epochs the train stage actually trains (a resumed finished run trains none)."""
    seen: list[int] = []

    def counting(*args, on_epoch_end=None, **kwargs):
        def hook(epoch, record):
            seen.append(epoch)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
        return train_cart(*args, on_epoch_end=hook, **kwargs)

    monkeypatch.setattr(train_stage, "train_cart", counting)
    return seen


@pytest.fixture
def edited_code(tmp_path, monkeypatch) -> str:
    """From here on, the training code's fingerprint is computed over a copy of the package whose
    model source file was edited (every parameter name kept); returns the edited file's path."""
    copy = tmp_path / "edited" / "cartlib"
    shutil.copytree(codegraph.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    source = copy / "model" / "cart.py"
    text = source.read_text()
    assert "nn.init.normal_(self.tok_emb.weight, std=0.02)" in text
    source.write_text(text.replace("nn.init.normal_(self.tok_emb.weight, std=0.02)",
                                   "nn.init.normal_(self.tok_emb.weight, std=0.05)"))
    real = codegraph.code_fingerprint
    assert real(["cartlib.stages.train"], package_dir=copy) != real(["cartlib.stages.train"])
    monkeypatch.setattr(codegraph, "code_fingerprint", lambda modules, package_dir=None: real(modules, package_dir=copy))
    return str(source)


def run_stage(paths, cfg=TINY):
    return train_stage.run(PARAMS, paths, cfg=cfg, progress=False, publish_results=False)


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


# ------------------------------------------------------------------------------ the train stage
def test_train_stage_resumes_an_interrupted_run_and_matches_an_uninterrupted_one(tmp_path, monkeypatch, epochs_run):
    full = run_stage(tiny_repo(tmp_path / "full"))
    assert epochs_run == [1, 2]
    epochs_run.clear()

    class Interrupted(Exception):
        pass

    def stop_after_first(*args, **kwargs):
        def hook(epoch, record):
            epochs_run.append(epoch)
            raise Interrupted
        return train_cart(*args, on_epoch_end=hook, **kwargs)

    cut = tiny_repo(tmp_path / "cut")
    with monkeypatch.context() as m:
        m.setattr(train_stage, "train_cart", stop_after_first)
        with pytest.raises(Interrupted):
            run_stage(cut)
    resumed = run_stage(cut)
    assert epochs_run == [1, 2]  # epoch 1 before the interrupt, epoch 2 after resuming
    assert_same_weights(full.model, resumed.model)
    assert full.history["loss"].tolist() == resumed.history["loss"].tolist()


@pytest.mark.parametrize("change", [{"dropout": 0.3}, {"n_heads": 2}])
def test_train_stage_retrains_when_dropout_or_n_heads_change(tmp_path, capsys, epochs_run, change):
    paths = tiny_repo(tmp_path / "a")
    run_stage(paths)
    changed = dataclasses.replace(TINY, **change)
    epochs_run.clear()
    again = run_stage(paths, changed)
    assert epochs_run == [1, 2], "the finished checkpoint of the old config was reused"
    (name, value), = change.items()
    assert f"train.{name}: {getattr(TINY, name)!r} -> {value!r}" in capsys.readouterr().out
    fresh = run_stage(tiny_repo(tmp_path / "b"), changed)  # what a clean run with the new config gives
    assert_same_weights(again.model, fresh.model)


def test_train_stage_retrains_after_an_edit_of_a_model_source_file(tmp_path, capsys, epochs_run, request):
    paths = tiny_repo(tmp_path / "a")
    run_stage(paths)
    epochs_run.clear()
    run_stage(paths)
    assert epochs_run == []  # unchanged: the finished checkpoint is the result
    request.getfixturevalue("edited_code")
    run_stage(paths)
    assert epochs_run == [1, 2], "weights of the old code were reused"
    assert "code differs" in capsys.readouterr().out


# ------------------------------------------------------------------------ train_cart's own key
@pytest.mark.parametrize("change", ["dropout", "n_heads", "code"])
def test_train_cart_resume_retrains_when_the_model_or_code_changes(tmp_path, capsys, request, change):
    kwargs = dict(tokenizer=tokenizer(), texts=TEXTS[:6], codes=CODES[:6], epochs=2, batch_size=3, max_length=16,
                  consistency_weight=0.3, progress=False, checkpoint_dir=tmp_path)
    train_cart(tiny_model(), **kwargs)
    epochs = []
    count = lambda epoch, record: epochs.append(epoch)
    train_cart(tiny_model(), resume=True, on_epoch_end=count, **kwargs)
    assert epochs == []  # the same run: nothing left to train
    model = {"dropout": lambda: tiny_model(dropout=0.3), "n_heads": lambda: _two_head_model(), "code": tiny_model}[change]
    if change == "code":
        request.getfixturevalue("edited_code")
    train_cart(model(), resume=True, on_epoch_end=count, **kwargs)
    assert epochs == [1, 2]
    out = capsys.readouterr().out
    assert "ignoring the stale checkpoint" in out and ("code differs" if change == "code" else f"model.{change}") in out


def _two_head_model():
    m = tiny_model()
    torch.manual_seed(0)
    from cartlib.model.cart import CartModel

    return CartModel(text_encoder=m.encoder, freeze_encoder=True, level_sizes=m.level_sizes, d_model=32, n_layers=2,
                     n_heads=2, dropout=0.1, fusion=True)


# ------------------------------------------------------------------------------- variant models
def test_variant_model_is_reused_only_with_the_same_config_and_code(tmp_path, capsys, request):
    from cartlib.config import EvaluateConfig, GridConfig
    from cartlib.stages.variant import run_variant

    paths = tiny_repo(tmp_path)  # its identifier table matches params.identifiers: the variant reuses it
    params = dataclasses.replace(PARAMS, train=TINY, evaluate=EvaluateConfig(beam=2, top_k=2),
                                 grid=GridConfig(train={"epochs": 1}, n_queries=0))
    row = lambda **over: run_variant(params, paths, overrides={"train": over}, progress=False)
    first = row()
    assert not first.cache_hit
    again = row()
    assert again.cache_hit and again.model_key == first.model_key
    assert again.run.equals(first.run)
    assert not row(dropout=0.3).cache_hit  # another config: another cache entry
    request.getfixturevalue("edited_code")
    edited = row()
    assert not edited.cache_hit, "a variant model of the old code was reused"
    assert edited.model_key == first.model_key  # the same variant, retrained and overwritten
    assert "code differs" in capsys.readouterr().out
    assert row().cache_hit


# ------------------------------------------------------------------------------ no silent zero
@pytest.mark.parametrize("pseudo", [(), ("train",)], ids=["none", "train_only"])
def test_caption_enhancement_without_pseudo_captions_stops_before_training(tmp_path, epochs_run, pseudo):
    from cartlib.config import ConfigError
    from cartlib.stages.variant import run_variant

    paths = tiny_repo(tmp_path, pseudo=pseudo)
    with pytest.raises(ConfigError, match="pseudo_captions.*caption_enhancement: false") as e:
        run_stage(paths)
    assert "docs/datasets.md" in str(e.value)
    assert epochs_run == []
    with pytest.raises(ConfigError, match="pseudo_captions"):  # a variant row stops too (before its identifiers)
        run_variant(PARAMS, paths, overrides={"train": {"epochs": 1}}, progress=False)
    assert not (paths.models / "variants").exists()
    # turned off knowingly: it trains
    run_stage(paths, dataclasses.replace(TINY, caption_enhancement=False, epochs=1))
    assert epochs_run == [1]
