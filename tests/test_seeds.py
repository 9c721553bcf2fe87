"""Training and identifier seeds are their own settings (train.seed, identifiers.seed), apart from
base.seed, which regenerates the benchmark: a seed replicate changes the model, not the data."""
from __future__ import annotations

import numpy as np
import torch

from cartlib.cache_key import run_key
from cartlib.config import load_params, with_overrides
from cartlib.data.idstore import IdentifierTable
from cartlib.ids.vocab import Vocabulary
from cartlib.stages import identifiers as identifiers_stage


def _table() -> IdentifierTable:
    codes = np.array([[0, 1], [1, 0]])
    vocab = Vocabulary(level_sizes=(2, 2))
    return IdentifierTable("cart", codes, np.array(["a", "b"]), vocab, vocab.fingerprint(codes), {})


def test_train_seed_is_part_of_the_models_key_and_base_seed_is_not_needed():
    params = load_params("params.yaml")
    one = with_overrides(params, {"train": {"seed": 1}})
    assert (params.train.seed, one.train.seed, one.base.seed) == (0, 1, params.base.seed)
    kw = dict(table=_table(), texts=["x", "y"], targets=torch.tensor([[0, 1], [1, 0]]))
    assert run_key(params.train, seed=params.train.seed, **kw).config_digest != \
        run_key(one.train, seed=one.train.seed, **kw).config_digest


def test_the_identifiers_stage_seeds_its_models_with_identifiers_seed(monkeypatch, tmp_path):
    seen = []

    class Stop(Exception):
        pass

    def fake_build(scheme, **kwargs):
        seen.append(kwargs["seed"])
        raise Stop

    monkeypatch.setattr(identifiers_stage, "build_identifier_model", fake_build)
    monkeypatch.setattr(identifiers_stage.schema, "load_dataset", lambda *a, **k: None)
    monkeypatch.setattr(identifiers_stage, "load_features",
                        lambda *a, **k: type("F", (), {"items": np.zeros((100, 4))})())
    params = with_overrides(load_params("params.yaml"), {"identifiers": {"seed": 7}})
    from cartlib.paths import task_paths

    try:
        identifiers_stage.run(params, task_paths(tmp_path, "image"), progress=False)
    except Stop:
        pass
    assert seen == [7]
