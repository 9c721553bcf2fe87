"""Tuning the grid's schedule on validation queries only (cartlib/tuning.py, scripts/tune_grid.py; issue 15 item 1).

A tiny task (train, test and val items, identifiers, features, pseudo-captions) and a tiny decoder on
the bundled frozen MiniLM: each training takes a second or two.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cartlib import tuning
from cartlib.captions.io import pseudo_captions_path, write_dataset_pseudo_captions
from cartlib.config import BaseConfig, ConfigError, EvaluateConfig, GridConfig, Params, TrainConfig
from cartlib.data import schema
from cartlib.data.features import save_features
from cartlib.data.idstore import save_identifiers
from cartlib.paths import task_paths
from cartlib.stages import variant
from cartlib.convergence import reached_plateau
from cartlib.tuning import MissingInputError, choose, tune, write_tuning

from test_schema import write_tiny

REPO = Path(__file__).resolve().parents[1]
TINY = TrainConfig(d_model=32, n_heads=4, n_layers=1, dropout=0.1, epochs=2, batch_size=8, lr=5e-3,
                   consistency_weight=0.5, max_length=16)
PARAMS = Params(base=BaseConfig(seed=0, device="cpu", tasks=("image",)), train=TINY,
                evaluate=EvaluateConfig(beam=3, top_k=3),
                grid=GridConfig(train={"max_train_items": 4, "epochs": 2, "patience": 1}))


def build_tiny_task(root: Path):
    """<root>/data/image/: dataset (4 test, 6 train, 4 val items), qrels.tsv, qrels_val.tsv,
    pseudo-captions, features and the `cart` identifiers, as the stages before `ablations` leave them."""
    paths = task_paths(root, "image")
    paths.data.mkdir(parents=True)
    write_tiny(paths.data, n_test=4, n_train=6, n_val=4)
    ds = schema.load_dataset(paths.dataset)
    write_dataset_pseudo_captions(ds, pseudo_captions_path(paths))
    refs = ds.captions[ds.captions["kind"] != "pseudo"]
    rng = np.random.default_rng(0)
    save_features(paths.features, items=rng.normal(size=(len(ds.items), 8)).astype(np.float32),
                  caption_ids=refs["caption_id"], captions=rng.normal(size=(len(refs), 8)).astype(np.float32),
                  meta={"text_model": "fake"})
    n = len(ds.items)
    codes = np.array([[i % 3, (i // 3) % 3, (i // 9) % 2] for i in range(n)])  # distinct
    save_identifiers(paths.data / "identifiers", scheme="cart", codes=codes, item_ids=ds.items["item_id"],
                     level_sizes=(3, 3, 2), has_unique_token=False,
                     meta={"config": dataclasses.asdict(PARAMS.identifiers)})
    return paths


@pytest.fixture
def tiny_task(tmp_path):
    return build_tiny_task(tmp_path)


# ------------------------------------------------------------------------------------------ (a) the rule
def test_the_best_validation_recall_within_the_budget_wins():
    c = choose([0.30, 0.50, 0.40], [100, 200, 50], budget_seconds=600)
    assert c.index == 1 and c.fits_budget == [True, True, True] and c.ties == [1]


def test_a_candidate_over_budget_is_never_chosen_while_another_fits():
    c = choose([0.30, 0.90, 0.40], [100, 601, 50], budget_seconds=600)
    assert c.index == 2 and c.fits_budget == [True, False, True]
    assert choose([0.3, 0.9], [100, 600], budget_seconds=600).index == 1  # "at most": the budget itself fits


def test_within_the_tolerance_the_cheaper_candidate_wins():
    # 0.497 and 0.5 are within 0.005 of the best 0.502: the fastest of the three
    c = choose([0.502, 0.497, 0.500, 0.490], [300, 250, 200, 10], budget_seconds=600)
    assert c.index == 2 and c.ties == [0, 1, 2]
    assert choose([0.505, 0.500], [300, 200], budget_seconds=600).index == 1  # exactly 0.005: a tie
    assert choose([0.506, 0.500], [300, 200], budget_seconds=600).index == 0  # beyond it: the better one
    assert choose([0.5, 0.5], [200, 200], budget_seconds=600).index == 0  # same time too: the first listed


def test_the_tie_is_measured_from_the_best_fitting_candidate():
    # the 0.9 over budget does not count: 0.5 is the best fitting, and 0.497 ties with it
    c = choose([0.9, 0.5, 0.497], [900, 300, 100], budget_seconds=600)
    assert c.index == 2


def test_when_nothing_fits_the_fastest_is_chosen_and_said():
    c = choose([0.5, 0.6], [700, 650], budget_seconds=600)
    assert c.index == 1 and c.fits_budget == [False, False] and "no candidate" in c.note


def test_a_candidate_that_reached_a_plateau_beats_a_better_one_still_improving():
    # 0.53 was still rising at its last allowed epoch: a grid trained on it would be budget-limited
    c = choose([0.53, 0.48, 0.46], [300, 250, 200], plateaued=[False, True, True], budget_seconds=600)
    assert c.index == 1 and c.ties == [1] and "reached a plateau" in c.note
    # a plateau over budget does not count: then the best within the budget, and the note says why
    c = choose([0.53, 0.48], [300, 700], plateaued=[False, True], budget_seconds=600)
    assert c.index == 0 and "budget-limited" in c.note
    # ties among the plateaued only: the cheaper still-improving one is not a tie
    c = choose([0.50, 0.499, 0.498], [300, 100, 200], plateaued=[True, False, True], budget_seconds=600)
    assert c.index == 2 and c.ties == [0, 2]
    with pytest.raises(ValueError, match="plateau flag"):
        choose([0.5, 0.4], [1, 2], plateaued=[True])


# ------------------------------------------------------------------- (b) validation queries only
def test_tuning_runs_and_writes_without_the_test_qrels(tiny_task, tmp_path, monkeypatch):
    tiny_task.qrels.unlink()  # the test qrels are gone: nothing may need them
    read = []
    real = schema.load_qrels

    def spy(path, *a, **k):
        read.append(Path(path).name)
        assert Path(path).name != "qrels.tsv", "tuning read the test qrels"
        return real(path, *a, **k)

    monkeypatch.setattr(schema, "load_qrels", spy)
    candidates = [{"lr": 5e-3}, {"lr": 1e-3, "epochs": 1}]
    result = tune(PARAMS, tiny_task.root, task="image", candidates=candidates, progress=False)
    assert read and set(read) == {"qrels_val.tsv"}

    t = result.table
    assert list(t["candidate"]) == ["c1", "c2"] and t["chosen"].sum() == 1
    assert list(t["epochs_trained"]) == [2, 1] and list(t["lr"]) == [5e-3, 1e-3]
    assert (t["n_train_texts"] > 0).all() and (t["trainable_params"] > 0).all()
    assert t["best_epoch"].between(1, 2).all() and t["val_recall_at_1"].between(0, 1).all()
    assert result.n_val_queries == 8  # 4 val items x 2 reference captions
    assert list(t["reached_plateau"]) == [  # at most 2 and 1 epochs, patience 1
        reached_plateau(epochs_trained=e, best_epoch=b, max_epochs=m, patience=1)
        for e, b, m in zip(t["epochs_trained"], t["best_epoch"], [2, 1])]
    expect = choose(t["val_recall_at_1"].tolist(), t["train_seconds"].tolist(),
                    plateaued=t["reached_plateau"].tolist(), budget_seconds=600)
    assert result.chosen == expect.index and result.chosen_overrides == candidates[expect.index]
    assert result.schedule == {**PARAMS.grid.train, **candidates[expect.index]}
    assert list(result.curves.columns) == ["candidate", "epoch", "val_recall_at_1", "loss", "lr", "seconds"]
    assert len(result.curves) == 3
    for _, row in t.iterrows():  # the table's best is the curve's best
        curve = result.curves[result.curves["candidate"] == row["candidate"]]
        assert row["val_recall_at_1"] == curve["val_recall_at_1"].max()

    out = tmp_path / "results" / "tuning"
    written = write_tuning(result, out, command="python scripts/tune_grid.py --task image")
    folder = out / "image"
    assert {p.name for p in written} == {"tuning.tsv", "tuning.timings.tsv", "curves.tsv", "curves.timings.tsv",
                                         "curves.png", "curves.pdf", "README.md"}
    table = pd.read_csv(folder / "tuning.tsv", sep="\t")
    assert not any(c.endswith("seconds") or "cache_hit" in c for c in table.columns)  # measurements apart
    assert {"train_seconds", "epoch_seconds", "model_cache_hit"} <= set(
        pd.read_csv(folder / "tuning.timings.tsv", sep="\t").columns)
    assert "seconds" in pd.read_csv(folder / "curves.timings.tsv", sep="\t").columns
    readme = (folder / "README.md").read_text()
    assert "validation queries" in readme and "Rule:" in readme and "python scripts/tune_grid.py" in readme
    assert json.dumps(result.chosen_overrides, sort_keys=True) in readme


# ---------------------------------------------------------------------------- (c) the grid's cache
def test_a_candidate_equal_to_the_grid_schedule_is_the_full_rows_seed_0_model(tiny_task):
    result = tune(PARAMS, tiny_task.root, task="image", candidates=[dict(PARAMS.grid.train), {"lr": 1e-3}],
                  progress=False)
    assert not result.table["model_cache_hit"].any()
    seed = PARAMS.ablations.seeds[0]
    row = variant.run_variant(PARAMS, tiny_task, overrides=variant.seed_overrides(PARAMS.ablations.rows["full"], seed),
                              progress=False)
    assert row.model_key == result.table["model_key"].iloc[0] and row.cache_hit  # trained once, by the tuning
    assert result.table["model_key"].iloc[1] != row.model_key
    assert row.metrics["val_recall_at_1"] == result.table["val_recall_at_1"].iloc[0]
    again = tune(PARAMS, tiny_task.root, task="image", candidates=[{}], progress=False)  # {} = grid.train as is
    assert again.table["model_cache_hit"].iloc[0] and again.table["model_key"].iloc[0] == row.model_key


# ---------------------------------------------------------------------------- (d) missing inputs
@pytest.mark.parametrize("missing", ["qrels_val.tsv", "identifiers/cart.npz", "features", "pseudo_captions.tsv"])
def test_a_missing_input_is_named_before_any_training(tiny_task, monkeypatch, missing):
    import shutil

    target = tiny_task.data / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    monkeypatch.setattr(tuning, "train_variant", lambda *a, **k: pytest.fail("trained despite a missing input"))
    with pytest.raises(MissingInputError, match="dvc repro identifiers@image captions@image") as e:
        tune(PARAMS, tiny_task.root, task="image", candidates=[{}], progress=False)
    assert str(target) in str(e.value)


def test_a_bad_candidate_fails_before_any_training(tiny_task, monkeypatch):
    monkeypatch.setattr(tuning, "train_variant", lambda *a, **k: pytest.fail("trained despite a bad candidate"))
    with pytest.raises(ConfigError, match="lrr"):
        tune(PARAMS, tiny_task.root, task="image", candidates=[{"lr": 1e-3}, {"lrr": 1e-3}], progress=False)


# ------------------------------------------------------------------------------------------ the CLI
def _script():
    spec = importlib.util.spec_from_file_location("tune_grid", REPO / "scripts" / "tune_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_help_lists_the_default_candidates_and_the_rule(capsys):
    with pytest.raises(SystemExit) as e:
        _script().main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--task", "--candidates", "--budget-seconds", "--root", "--out", "--params"):
        assert option in out
    assert '"d_model": 256' in out and "Rule:" in out
    assert out.count("\"d_model\"") == len(tuning.DEFAULT_CANDIDATES)  # every default candidate is listed


def test_cli_stops_with_the_dvc_command_when_inputs_are_missing(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert _script().main(["--root", str(tmp_path), "--task", "image", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "qrels_val.tsv" in err and "dvc repro identifiers@image captions@image" in err
    assert not (tmp_path / "results").exists()


def test_cli_reads_a_candidates_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("candidates:\n  - {d_model: 64, lr: 0.002}\n  - {d_model: 32}\n")
    assert _script().read_candidates(path) == [{"d_model": 64, "lr": 0.002}, {"d_model": 32}]
    (tmp_path / "c.json").write_text('[{"lr": 0.001}]')
    assert _script().read_candidates(tmp_path / "c.json") == [{"lr": 0.001}]
    (tmp_path / "bad.yaml").write_text("lr: 0.001\n")
    with pytest.raises(SystemExit, match="list of mappings"):
        _script().read_candidates(tmp_path / "bad.yaml")
