"""Data-parallel training (cartlib.distributed): 2 CPU processes (gloo) follow the 1-process run.

The oracle is the 1-process run with the same global batch: with dropout 0 and the consistency
loss off, both compute the gradient of the same global mean loss, so the loss curve and the
weights agree up to float summation order (tolerance 1e-5). With dropout on, the 2-process run
draws its own masks (rank r from seed + r) and is checked against itself: an interrupted run
resumes to bit-identical weights.
"""
from __future__ import annotations

import pytest
import torch

from cartlib import distributed
from cartlib.ids.prefix import PrefixIndex
from cartlib.io import torch_load
from cartlib.train import CHECKPOINT_NAME, TrainBatch, ValidationSet, autocast, train_cart, train_step
from test_train import CODES, SIZES, TEXTS, tokenizer
from test_train import tiny_model as _tiny_model

TOL = 1e-5  # the loss curve (the criterion)
# AdamW divides by sqrt(v): a near-zero gradient's summation-order noise can move a weight by up to
# lr per step, so weights are compared at the scale of the learning rate, not of float rounding
WEIGHT_TOL = 1e-3


def tiny_model(*, seed: int = 0, freeze: bool = True, dropout: float = 0.1):
    """test_train's tiny model; with ``dropout=0`` the (fine-tuned) encoder's dropout is off too."""
    model = _tiny_model(seed=seed, freeze=freeze, dropout=dropout)
    if dropout == 0.0:
        enc = model.encoder
        enc.config.hidden_dropout_prob = enc.config.attention_probs_dropout_prob = 0.0
        state = enc.state_dict()
        model.encoder = type(enc)(enc.config)
        model.encoder.load_state_dict(state)
        model.encoder.requires_grad_(not freeze)
    return model


def _kwargs(**over):
    kw = dict(tokenizer=tokenizer(), texts=TEXTS, codes=CODES, epochs=3, batch_size=7, lr=3e-3, weight_decay=0.01,
              warmup_ratio=0.2, grad_clip=0.5, consistency_weight=0.0, seed=3, max_length=16, progress=False,
              val=ValidationSet(TEXTS, torch.arange(len(TEXTS)), PrefixIndex.build(CODES, SIZES), CODES), val_beam=3)
    kw.update(over)
    return kw


def _max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].numel())


@pytest.mark.parametrize("freeze", [True, False])
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, freeze: bool) -> None:
    # 20 texts in global batches of 7: the last batch (6 texts) splits 3 + 3, the others 4 + 3
    one = train_cart(tiny_model(freeze=freeze, dropout=0.0), checkpoint_dir=tmp_path / "one", **_kwargs())
    two = train_cart(tiny_model(freeze=freeze, dropout=0.0), checkpoint_dir=tmp_path / "two", nproc=2, **_kwargs())
    assert len(torch_load(tmp_path / "two" / CHECKPOINT_NAME)["rng_ranks"]) == 2  # two ranks did train
    assert [h["epoch"] for h in two.history] == [1, 2, 3]
    for h1, h2 in zip(one.history, two.history):
        for k in ("loss", "ce", "lr", "val_recall_at_1"):
            assert h2[k] == pytest.approx(h1[k], abs=TOL), (k, h1, h2)
        # the summed gradient is the global batch's (Adam would hide a constant factor in the loss curve)
        assert h2["grad_norm"] == pytest.approx(h1["grad_norm"], rel=1e-4), (h1, h2)
    assert one.history[-1]["loss"] < one.history[0]["loss"]  # it did learn: the curve is not flat
    assert _max_weight_diff(one.model, two.model) < WEIGHT_TOL


def test_an_empty_share_of_a_small_batch_only_joins_the_all_reduce(tmp_path) -> None:
    # 5 texts in batches of 2: the last batch (1 text) leaves rank 1 without texts
    kw = _kwargs(texts=TEXTS[:5], codes=CODES[:5], batch_size=2, epochs=2, val=None)
    one = train_cart(tiny_model(dropout=0.0), **kw)
    two = train_cart(tiny_model(dropout=0.0), nproc=2, **kw)
    assert [h["loss"] for h in two.history] == pytest.approx([h["loss"] for h in one.history], abs=TOL)
    assert _max_weight_diff(one.model, two.model) < WEIGHT_TOL


def test_an_interrupted_two_process_run_resumes_to_the_same_weights(tmp_path) -> None:
    kw = _kwargs(consistency_weight=1.0, nproc=2)  # dropout 0.1 and R-Drop: every rank's RNG matters
    full = train_cart(tiny_model(), checkpoint_dir=tmp_path / "full", **kw)
    cut = train_cart(tiny_model(), checkpoint_dir=tmp_path / "cut", stop_after=1, **kw)
    assert [h["epoch"] for h in cut.history] == [1]
    torch.manual_seed(99)  # the caller's RNG state must not matter: the checkpoint restores every rank's
    resumed = train_cart(tiny_model(seed=5), checkpoint_dir=tmp_path / "cut", resume=True, **kw)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert _max_weight_diff(full.model, resumed.model) == 0.0


def test_a_finished_checkpoint_is_loaded_without_launching_workers(tmp_path, monkeypatch) -> None:
    kw = _kwargs(epochs=1, nproc=2)
    first = train_cart(tiny_model(dropout=0.0), checkpoint_dir=tmp_path, resume=True, **kw)

    def no_launch(*args, **kwargs):
        raise AssertionError("workers were launched for a finished run")

    monkeypatch.setattr("cartlib.train.launch", no_launch)
    again = train_cart(tiny_model(seed=5, dropout=0.0), checkpoint_dir=tmp_path, resume=True, **kw)
    assert _max_weight_diff(first.model, again.model) == 0.0
    assert again.history == first.history


def test_shard_gives_every_text_of_a_batch_to_exactly_one_rank() -> None:
    idx = torch.tensor([9, 4, 7, 1, 3])
    shares = [distributed.shard(idx, distributed.RankInfo(r, 3)) for r in range(3)]
    assert sorted(torch.cat(shares).tolist()) == sorted(idx.tolist())
    assert [len(s) for s in shares] == [2, 2, 1]


def test_bf16_training_keeps_fp32_weights_and_tracks_the_fp32_loss() -> None:
    """The GPU's precision path (bf16 autocast), run on the CPU: same code, the CPU device."""
    kw = _kwargs(val=None, epochs=6, lr=1e-2)
    fp32 = train_cart(tiny_model(dropout=0.0), **kw)
    bf16 = train_cart(tiny_model(dropout=0.0), precision="bf16", **kw)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert bf16.history[-1]["loss"] < 0.85 * bf16.history[0]["loss"]
    for a, b in zip(fp32.history, bf16.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
    assert [a["loss"] for a in fp32.history] != [b["loss"] for b in bf16.history]  # bf16 really ran


def test_train_step_weights_the_gradient_by_the_share_of_the_global_batch() -> None:
    """Two half-batches, each weighted by ½ and summed, give the full batch's gradient."""
    model = tiny_model(dropout=0.0)
    tok = tokenizer()(TEXTS[:6], padding=True, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]

    def grads(parts):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights alone
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        total = None
        for rows, weight in parts:
            captured = {}
            train_step(model, opt, sched, TrainBatch(ids[rows], mask[rows], CODES[rows]), consistency_weight=0.0,
                       grad_clip=0.0, grad_weight=weight,
                       reduce_grads=lambda ps: captured.update({id(p): p.grad.clone() for p in ps if p.grad is not None}))
            total = captured if total is None else {k: total[k] + v for k, v in captured.items()}
        return total

    whole = grads([(slice(0, 6), 1.0)])
    halves = grads([(slice(0, 3), 0.5), (slice(3, 6), 0.5)])
    assert max(float((whole[k] - halves[k]).abs().max()) for k in whole) < 1e-6


def test_autocast_is_off_for_fp32_and_bf16_for_bf16() -> None:
    x = torch.randn(4, 4)
    with autocast("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16


@pytest.mark.slow
def test_the_train_stage_at_smoke_scale_with_two_processes_follows_one(smoke_repo, tmp_path) -> None:
    """The train stage itself (MiniLM, the smoke benchmark's texts, validation), 1 vs 2 processes."""
    import shutil

    from cartlib.config import load_params, with_overrides
    from cartlib.paths import task_paths
    from cartlib.stages import train as train_stage

    root = tmp_path / "repo"  # the smoke run's data and params; models/ of its own
    root.mkdir()
    shutil.copy(smoke_repo / "params.yaml", root / "params.yaml")
    (root / "data").symlink_to(smoke_repo / "data")
    params = load_params(root / "params.yaml")
    paths = task_paths(root, "audio")
    history = {}
    for nproc in (1, 2):
        p = with_overrides(params, {"train": {"dropout": 0.0, "consistency_weight": 0.0, "nproc": nproc}})
        result = train_stage.run(p, paths, progress=False, out_name=f"cart_{nproc}.pt", publish_results=False)
        history[nproc] = result.history
    assert len(history[1]) == len(history[2]) >= 2
    for k in ("loss", "ce", "val_recall_at_1"):
        assert history[2][k].tolist() == pytest.approx(history[1][k].tolist(), abs=TOL), k
    assert history[2]["grad_norm"].tolist() == pytest.approx(history[1]["grad_norm"].tolist(), rel=1e-4)
    assert history[1]["loss"].iloc[-1] < history[1]["loss"].iloc[0]

    # the README's torchrun line (one node here): every launched process runs the stage's training,
    # rank 0 writes the checkpoint, and the stage then loads it without launching workers
    import subprocess
    import sys

    import yaml

    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"].update(dropout=0.0, consistency_weight=0.0, nproc=2)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cartlib.distributed", "--task", "audio", "--root", str(root)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def no_launch(*args, **kwargs):
        raise AssertionError("the stage relaunched workers although torchrun had finished the run")

    import cartlib.train

    original, cartlib.train.launch = cartlib.train.launch, no_launch
    try:
        result = train_stage.run(load_params(root / "params.yaml"), paths, progress=False, publish_results=False)
    finally:
        cartlib.train.launch = original
    assert result.history["loss"].tolist() == pytest.approx(history[2]["loss"].tolist(), abs=TOL)
