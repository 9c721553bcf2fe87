from pathlib import Path

import pytest

from cartlib.config import ConfigError, Scale, check_task, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.base.scale is Scale.DEFAULT
    assert params.data.n_test == 1000 and params.data.n_train == 5000
    assert set(params.base.tasks) == {"image", "audio", "video"}


def test_smoke_scale_applies_overrides():
    raw = {"base": {"scale": "smoke"}, "data": {"n_train": 5000}, "smoke": {"data": {"n_train": 200}}}
    assert params_from_dict(raw).data.n_train == 200
    raw["base"]["scale"] = "default"
    assert params_from_dict(raw).data.n_train == 5000


@pytest.mark.parametrize("raw, needle", [
    ({"data": {"n_trian": 5}}, "n_trian"),
    ({"bogus": {}}, "bogus"),
    ({"data": {"n_train": "many"}}, "data.n_train"),
    ({"data": {"captioner_error_rate": 1.5}}, "captioner_error_rate"),
    ({"base": {"tasks": ["image", "smell"]}}, "smell"),
    ({"base": {"scale": "huge"}}, "huge"),
    ({"smoke": {"data": {"n_tset": 1}}}, "n_tset"),
])
def test_bad_params_name_the_key(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        params_from_dict(raw, source="params.yaml")


def test_unknown_task_is_named():
    with pytest.raises(ConfigError, match="'smell'"):
        check_task("smell")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_dataclass_defaults_equal_params_yaml():
    """One source of defaults: `Params()` (no file) is the suite's params.yaml, key by key.

    `ablations.rows` is exempt: it is the list of experiments, not a hyperparameter default; so is
    `grid.train`, the grid's schedule for one machine's budget, chosen on validation queries
    (`results/tuning/`): its dataclass default (no overrides) is the grid at the main scale.
    `train.epochs` is exempt (16 in params.yaml, 8 in TrainConfig): cartlib/config.py is a dependency
    of every stage and part of the training code's fingerprint, which also keys the grid's cached
    models; aligning it restales the grid's 25 trainings (about 3.8 hours) that a change of
    `train.epochs` alone leaves valid. Align it with the next change that retrains the grid anyway.
    """
    import dataclasses

    import yaml

    from cartlib.config import SECTIONS, Params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.pop("smoke")
    from_file, defaults = params_from_dict(raw), Params()
    drift = [f"{name}.{f.name}: dataclass {getattr(getattr(defaults, name), f.name)!r} != "
             f"params.yaml {getattr(getattr(from_file, name), f.name)!r}"
             for name in SECTIONS for f in dataclasses.fields(SECTIONS[name])
             if (name, f.name) not in {("ablations", "rows"), ("grid", "train"), ("train", "epochs")}
             and getattr(getattr(defaults, name), f.name) != getattr(getattr(from_file, name), f.name)]
    assert not drift, "\n".join(drift)
    missing = [f"{name}.{f.name}" for name in SECTIONS for f in dataclasses.fields(SECTIONS[name])
               if f.name not in (raw.get(name) or {})]
    assert not missing, f"keys with a dataclass default but absent from params.yaml: {missing}"
