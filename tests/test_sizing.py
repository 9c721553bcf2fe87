"""Trainable-parameter counts and the size-matched "w/o fusion" control (cartlib.model.sizing)."""
from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from cartlib.config import TrainConfig
from cartlib.model.cart import CartModel
from cartlib.model.fusion import FusionMode
from cartlib.model.sizing import matched_d_ff, trainable_parameters
from cartlib.stages.train import build_model
from test_train import tiny_model


def test_trainable_parameters_counts_only_what_the_optimizer_updates() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # hand count: 3·4 + 4 and 4·2 + 2
    net[0].requires_grad_(False)
    assert trainable_parameters(net) == 4 * 2 + 2


@pytest.mark.parametrize("mode", [FusionMode.LAST_LAYER, FusionMode.COARSE, FusionMode.FINE])
def test_matched_d_ff_gives_the_fused_decoders_parameter_count(mode) -> None:
    enc = tiny_model().encoder
    kw = dict(level_sizes=(5, 7, 3), d_model=32, n_layers=2, n_heads=4)
    d_ff, count, target = matched_d_ff(enc, fusion=mode, **kw)
    # oracle: the real models, built and counted
    fused = CartModel(text_encoder=enc, freeze_encoder=True, fusion=FusionMode.TWO_BRANCH, **kw)
    plain = CartModel(text_encoder=enc, freeze_encoder=True, fusion=mode, d_ff=d_ff, **kw)
    assert target == trainable_parameters(fused) and count == trainable_parameters(plain)
    assert abs(count - target) <= 2 * (2 * 32 + 1)  # within one unit of d_ff in each of the 2 layers
    if mode is FusionMode.LAST_LAYER:  # plain cross-attention is much smaller unless widened
        small = CartModel(text_encoder=enc, freeze_encoder=True, fusion=mode, **kw)
        assert trainable_parameters(small) < 0.8 * target and d_ff > 4 * 32


def test_build_model_reads_the_fusion_controls_from_the_config() -> None:
    cfg = TrainConfig(d_model=32, n_heads=4, n_layers=1)
    _, fused = build_model(cfg, (8, 8))
    _, coarse = build_model(dataclasses.replace(cfg, fusion_branches="coarse"), (8, 8))
    _, plain = build_model(dataclasses.replace(cfg, fusion=False), (8, 8))
    _, matched = build_model(dataclasses.replace(cfg, fusion=False, match_fusion_params=True), (8, 8))
    assert (fused.fusion_mode, coarse.fusion_mode, plain.fusion_mode) == (
        FusionMode.TWO_BRANCH, FusionMode.COARSE, FusionMode.LAST_LAYER)
    n = trainable_parameters(fused)
    assert trainable_parameters(plain) < 0.8 * n
    assert abs(trainable_parameters(matched) - n) <= 0.05 * n  # the 5%
