"""Choosing the ablation grid's schedule (``params.yaml`` ``grid.train``) on validation queries only.

Each candidate is a dict of ``train`` overrides (``{"d_model": 128, "lr": 2e-3, "max_train_items": 1000}``)
laid over ``grid.train``, i.e. the schedule the grid would have if ``grid.train`` were
``{**grid.train, **candidate}``. For each one the grid's `full` row is trained exactly as stage
`ablations` trains it with its first seed (:func:`cartlib.stages.variant.train_variant`: the same
training pairs, identifier table, validation set and model cache ``models/<task>/variants/``), so a
candidate equal to the committed schedule and ``ablations@<task>-full``'s seed-0 run share one
cached model.

Only validation data is read: the validation queries (reference captions of the val items) and
``data/<task>/qrels_val.tsv``, through the validation recall@1 that training computes after each
epoch. No test query, no ``data/<task>/qrels.tsv`` and no test metric is read here.

The rule (:data:`RULE`, :func:`choose`): among the candidates whose training took at most
``budget_seconds`` (``train_seconds``: the sum of the epochs' training seconds, as the grid's own
timings report it; the per-epoch validation passes are not counted, ``wall_seconds`` shows them),
take the highest best-epoch validation R@1; every candidate within ``TIE_TOLERANCE`` (0.005) of it
is a tie, and the tie that trained in the fewest seconds is chosen (then the earliest listed). When
no candidate fits the budget, the fastest one is chosen and the output says so.

:func:`write_tuning` writes ``<out>/<task>/``: ``tuning.tsv`` (one row per candidate) and
``tuning.timings.tsv`` (its measurement columns: seconds, cache hits, by
:func:`cartlib.results.split_table`), ``curves.tsv`` / ``curves.timings.tsv`` (one row per
candidate and epoch), ``curves.png`` / ``curves.pdf`` and ``README.md``. ``scripts/tune_grid.py``
is the command line.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from cartlib import io
from cartlib.config import ConfigError, Params, resolve_device, with_overrides
from cartlib.convergence import FLAT_TOLERANCE, reached_plateau
from cartlib.model.sizing import trainable_parameters
from cartlib.paths import TaskPaths, task_paths
from cartlib.results import split_table
from cartlib.stages.variant import grid_params, seed_overrides, train_variant, variant_dataset

__all__ = ["DEFAULT_CANDIDATES", "DEFAULT_BUDGET_SECONDS", "TIE_TOLERANCE", "RULE", "Choice", "TuningResult",
           "MissingInputError", "candidate_params", "check_inputs", "choose", "tune",
           "write_tuning", "curves_figure"]

DEFAULT_BUDGET_SECONDS = 360.0  # 6 min of training epochs: with the validation passes and the test scoring
                                # about 9 min per grid training on 2 CPU cores, so that the 25 trainings
                                # of the grid fit the default run's 8 hours beside the main models
TIE_TOLERANCE = FLAT_TOLERANCE  # 0.005: validation R@1 closer than this to the best is a tie (the cheaper
                                # candidate wins), and a curve that gained no more has levelled off
# a small grid on the default benchmark (scripts/tune_grid.py without --candidates), in the order it was
# tried. First, schedules whose cosine decay ends within about the budget: a reference over it (12
# epochs: where does validation R@1 plateau at this scale?), then about equal cost (~44 s per epoch of
# 1,000 items at d_model 128 on 2 CPU cores): the learning rate at 8 epochs, twice the width or twice
# the train items for half the epochs. None reached a plateau: each was still improving at its last
# epoch. Then fewer train items (~30 s per epoch of 500) at a higher rate and a long decay (16 epochs
# at most), so that early stopping, not the schedule's end, ends the training; and a narrower decoder
_SCHEDULE = {"patience": 2, "refs_per_item": 0}
DEFAULT_CANDIDATES: tuple[dict, ...] = (
    {"max_train_items": 1000, "d_model": 128, "lr": 1e-3, "epochs": 12, **_SCHEDULE},
    {"max_train_items": 1000, "d_model": 128, "lr": 1e-3, "epochs": 8, **_SCHEDULE},
    {"max_train_items": 1000, "d_model": 128, "lr": 2e-3, "epochs": 8, **_SCHEDULE},
    {"max_train_items": 1000, "d_model": 256, "lr": 1e-3, "epochs": 4, **_SCHEDULE},
    {"max_train_items": 2000, "d_model": 128, "lr": 1e-3, "epochs": 4, **_SCHEDULE},
    {"max_train_items": 500, "d_model": 128, "lr": 2e-3, "epochs": 16, **_SCHEDULE},
    {"max_train_items": 500, "d_model": 64, "lr": 2e-3, "epochs": 16, **_SCHEDULE},
)
RULE = (f"among the candidates that reached a plateau (stopped early after `patience` epochs without a better "
        f"validation R@1, or no better one in the last `patience` epochs, or at most {FLAT_TOLERANCE} better: "
        f"cartlib/convergence.py) and whose training took at most the budget (train_seconds: the epochs' training "
        f"seconds), the highest best-epoch validation R@1; candidates within {TIE_TOLERANCE} of that R@1 are ties and "
        f"the one with the fewest train_seconds wins (then the earliest listed). If none of those reached a plateau, "
        f"the same among all within the budget (the grid is then budget-limited, and the note says so); if none fits "
        f"the budget, the fastest candidate")


class MissingInputError(FileNotFoundError):
    """An input of the tuning runs (written by earlier pipeline stages) is missing."""


class Choice(NamedTuple):
    index: int  # position of the chosen candidate
    fits_budget: list[bool]  # per candidate: train_seconds ≤ budget
    ties: list[int]  # candidates within the tolerance of the best fitting one (the chosen among them)
    note: str  # why, in one line


class TuningResult(NamedTuple):
    task: str
    table: pd.DataFrame  # one row per candidate (see write_tuning for the columns)
    curves: pd.DataFrame  # one row per candidate and epoch: candidate, epoch, val_recall_at_1, loss, lr, seconds
    chosen: int  # row of ``table``
    chosen_overrides: dict  # the chosen candidate as given
    schedule: dict  # the grid schedule it stands for: {**params.grid.train, **chosen_overrides}
    base_schedule: dict  # params.grid.train when tuned
    budget_seconds: float
    rule: str
    note: str  # the choice's one-line reason
    n_val_queries: int
    seed: int  # the training seed (the first of ablations.seeds, as the grid's `full` row)
    device: str
    threads: int  # torch intra-op threads (the seconds depend on them)


def candidate_params(params: Params, candidate: Mapping) -> Params:
    """``params`` whose grid schedule is ``{**params.grid.train, **candidate}`` (validated: a key
    that is not a ``train`` setting raises ConfigError naming it)."""
    if not isinstance(candidate, Mapping):
        raise ConfigError(f"a tuning candidate must be a mapping of train overrides, got {candidate!r}")
    schedule = {**params.grid.train, **dict(candidate)}
    with_overrides(params, {"train": schedule}, where=f"tuning candidate {dict(candidate)}")
    return dataclasses.replace(params, grid=dataclasses.replace(params.grid, train=schedule))


def _full_row(params: Params) -> tuple[dict, int]:
    """The overrides of the grid's `full` row with its first seed, as ``run_ablation`` passes them."""
    seed = params.ablations.seeds[0]
    return seed_overrides(params.ablations.rows.get("full", {}), seed), seed


def check_inputs(paths: TaskPaths, scheme: str) -> None:
    """Raise :class:`MissingInputError` naming every missing input before any training."""
    from cartlib.captions.io import pseudo_captions_path

    needed = [paths.dataset, paths.features, paths.data / "identifiers" / f"{scheme}.npz", paths.qrels_val,
              pseudo_captions_path(paths)]
    missing = [p for p in needed if not p.exists()]
    if missing:
        raise MissingInputError(
            f"tuning on task {paths.task!r} needs {', '.join(str(p) for p in missing)} (missing); run "
            f"`dvc repro identifiers@{paths.task} captions@{paths.task}` first")


def choose(scores: Sequence[float], seconds: Sequence[float], *, plateaued: Sequence[bool] | None = None,
           budget_seconds: float = DEFAULT_BUDGET_SECONDS, tolerance: float = TIE_TOLERANCE) -> Choice:
    """The candidate :data:`RULE` picks, from each candidate's best validation R@1 (``scores``),
    training seconds (``seconds``) and whether it reached a plateau (``plateaued``, see
    :func:`cartlib.convergence.reached_plateau`; None: not known, every candidate counts as one)."""
    if not len(scores) or len(scores) != len(seconds):
        raise ValueError(f"choose: need one score and one time per candidate (got {len(scores)} and {len(seconds)})")
    plateaued = [True] * len(scores) if plateaued is None else [bool(p) for p in plateaued]
    if len(plateaued) != len(scores):
        raise ValueError(f"choose: need one plateau flag per candidate (got {len(plateaued)} for {len(scores)})")
    fits = [float(s) <= budget_seconds for s in seconds]
    fitting = [i for i, ok in enumerate(fits) if ok]
    if not fitting:
        i = min(range(len(seconds)), key=lambda j: (seconds[j], j))
        return Choice(i, fits, [i], f"no candidate trained within {budget_seconds:g} s: the fastest "
                                    f"({seconds[i]:.1f} s) is chosen")
    converged = [i for i in fitting if plateaued[i]]
    pool = converged or fitting
    best = max(scores[i] for i in pool)
    ties = [i for i in pool if scores[i] >= best - tolerance - 1e-12]
    i = min(ties, key=lambda j: (seconds[j], j))
    where = ("among the candidates that reached a plateau within the" if converged else
             "no candidate reached a plateau within the budget, so the grid's models will be budget-limited; "
             "best among all within the")
    note = (f"best validation R@1 {where} {budget_seconds:g} s budget: {best:.4f}; "
            + (f"{len(ties)} candidates within {tolerance}, the cheapest chosen ({seconds[i]:.1f} s, R@1 "
               f"{scores[i]:.4f})" if len(ties) > 1 else f"no other within {tolerance}"))
    return Choice(i, fits, ties, note)


def _label(candidate: Mapping, varying: Sequence[str]) -> str:
    keys = [k for k in varying if k in candidate] or list(candidate)
    return ", ".join(f"{k}={candidate[k]:g}" if isinstance(candidate[k], float) else f"{k}={candidate[k]}"
                     for k in keys) or "grid.train as is"


def tune(params: Params, root: str | Path, *, task: str, candidates: Sequence[Mapping],
         budget_seconds: float = DEFAULT_BUDGET_SECONDS, progress: bool = True) -> TuningResult:
    """Train the grid's `full` row (first seed) on each candidate schedule and choose one by :data:`RULE`.

    ``candidates``: dicts of ``train`` overrides laid over ``params.grid.train`` (all are validated,
    and the inputs checked, before the first training). Trained models go to, and come from, the
    grid's cache ``models/<task>/variants/``. Reads validation queries and ``qrels_val.tsv`` only."""
    if not candidates:
        raise ValueError("tune: no candidates")
    candidates = [dict(c) for c in candidates]
    per_candidate = [candidate_params(params, c) for c in candidates]  # all validated before any training
    overrides, seed = _full_row(params)
    rows = [grid_params(p, overrides) for p in per_candidate]
    paths = task_paths(root, task)
    check_inputs(paths, rows[0].identifiers.scheme)
    dataset = variant_dataset(paths)

    varying = [k for k in dict.fromkeys(k for c in candidates for k in c)
               if len({json.dumps(c.get(k), sort_keys=True) for c in candidates}) > 1]
    shown = list(dict.fromkeys([*params.grid.train, *(k for c in candidates for k in c), "lr"]))
    records, curves, n_val = [], [], 0
    for i, (candidate, p) in enumerate(zip(candidates, rows)):
        name = f"c{i + 1}"
        if progress:
            print(f"tuning {task} {name}/{len(candidates)}: {json.dumps(candidate, sort_keys=True)}", flush=True)
        start = time.perf_counter()
        run = train_variant(p, paths, dataset, progress=progress)
        wall = time.perf_counter() - start
        if run.val is None:
            raise MissingInputError(f"{paths.qrels_val}: task {task!r} has no validation queries to tune on")
        n_val = len(run.val.texts)
        history = run.trained.history
        scores = [float(h["val_recall_at_1"]) for h in history]
        seconds = [float(h["seconds"]) for h in history]
        cfg = p.train
        records.append({
            "candidate": name,
            "label": _label(candidate, varying),
            "overrides": json.dumps(candidate, sort_keys=True),
            **{k: getattr(cfg, k) for k in shown},
            "trainable_params": int(trainable_parameters(run.trained.model)),
            "n_train_texts": len(run.pairs.texts),
            "epochs_trained": len(history),
            "best_epoch": 1 + int(np.argmax(scores)),
            "reached_plateau": reached_plateau(epochs_trained=len(history), best_epoch=1 + int(np.argmax(scores)),
                                               max_epochs=cfg.epochs, patience=cfg.patience, curve=scores),
            "val_recall_at_1": max(scores),
            "val_recall_at_1_per_epoch": " ".join(f"{s:.4f}" for s in scores),
            "epoch_seconds": round(float(np.mean(seconds)), 1),
            "train_seconds": round(float(sum(seconds)), 1),
            "wall_seconds": round(wall, 1),
            "model_key": run.trained.key.config_digest,
            "model_cache_hit": run.trained.cache_hit,
        })
        curves += [{"candidate": name, "epoch": int(h["epoch"]), "val_recall_at_1": float(h["val_recall_at_1"]),
                    "loss": float(h["loss"]), "lr": float(h["lr"]), "seconds": round(float(h["seconds"]), 2)}
                   for h in history]
        del run  # the model: one at a time in memory

    table = pd.DataFrame(records)
    choice = choose(table["val_recall_at_1"].tolist(), table["train_seconds"].tolist(),
                    plateaued=table["reached_plateau"].tolist(), budget_seconds=budget_seconds)
    table.insert(table.columns.get_loc("model_key"), "fits_budget", choice.fits_budget)
    table.insert(table.columns.get_loc("model_key"), "chosen", [i == choice.index for i in range(len(table))])
    chosen = candidates[choice.index]
    if progress:
        print(f"tuning {task}: chose {table['candidate'][choice.index]} {json.dumps(chosen, sort_keys=True)} "
              f"({choice.note})", flush=True)
    return TuningResult(task=task, table=table, curves=pd.DataFrame(curves), chosen=choice.index,
                        chosen_overrides=chosen, schedule={**params.grid.train, **chosen},
                        base_schedule=dict(params.grid.train), budget_seconds=float(budget_seconds), rule=RULE,
                        note=choice.note, n_val_queries=n_val, seed=seed,
                        device=resolve_device(params.base.device), threads=torch.get_num_threads())


def curves_figure(result: TuningResult):
    """Validation R@1 per epoch, one line per candidate, the chosen one highlighted (no file I/O)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    labels = dict(zip(result.table["candidate"], result.table["label"]))
    chosen = result.table["candidate"].iloc[result.chosen]
    for name, sub in result.curves.groupby("candidate", sort=False):
        best = sub.loc[sub["val_recall_at_1"].idxmax()]
        is_chosen = name == chosen
        line, = ax.plot(sub["epoch"], sub["val_recall_at_1"], marker="o", ms=3 if not is_chosen else 5,
                        lw=2.6 if is_chosen else 1.1, alpha=1.0 if is_chosen else 0.6, zorder=3 if is_chosen else 2,
                        label=f"{name}: {labels[name]}" + (" (chosen)" if is_chosen else ""))
        ax.plot([best["epoch"]], [best["val_recall_at_1"]], marker="*", ms=11 if is_chosen else 7,
                color=line.get_color(), zorder=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation recall@1")
    ax.set_title(f"{result.task}: grid schedule tuning, R@1 on {result.n_val_queries} validation queries "
                 f"(★ best epoch)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt="g")


def write_tuning(result: TuningResult, out_dir: str | Path, *, command: str | None = None) -> list[Path]:
    """Write ``<out_dir>/<task>/``: tuning.tsv (+ tuning.timings.tsv), curves.tsv (+ curves.timings.tsv),
    curves.png/.pdf and README.md (atomic writes). Returns the paths written."""
    out = Path(out_dir) / result.task
    written = []
    for name, frame in (("tuning", result.table), ("curves", result.curves)):
        kept, timings = split_table(frame)
        written.append(io.write_dataframe_tsv(out / f"{name}.tsv", kept))
        if timings is not None:
            written.append(io.write_dataframe_tsv(out / f"{name}.timings.tsv", timings))
    fig = curves_figure(result)
    written += io.save_figure(fig, out / "curves")
    import matplotlib.pyplot as plt

    plt.close(fig)
    written.append(io.write_text(out / "README.md", readme(result, command=command)))
    return written


def readme(result: TuningResult, *, command: str | None = None) -> str:
    """The README.md of a tuning run: what was tuned, the rule, the choice, the table, the command."""
    t = result.table
    name = t["candidate"].iloc[result.chosen]
    shown = [c for c in ("candidate", "label", "trainable_params", "n_train_texts", "epochs_trained", "best_epoch",
                         "reached_plateau", "val_recall_at_1", "epoch_seconds", "train_seconds", "wall_seconds",
                         "fits_budget", "chosen",
                         "model_cache_hit") if c in t.columns]
    lines = [
        f"# Grid schedule tuning: {result.task}",
        "",
        "What was tuned: the schedule every row of the ablation grid shares (`params.yaml` `grid.train`, overrides "
        "of `train`): learning rate, decoder width and the training budget. Each candidate below is a set of "
        f"`train` overrides laid over `grid.train` as it was (`{json.dumps(result.base_schedule, sort_keys=True)}`); "
        f"for each, the grid's `full` row was trained exactly as stage `ablations` trains it (training seed "
        f"{result.seed}, the same model cache `models/{result.task}/variants/`).",
        "",
        f"Chosen on validation queries only: validation recall@1 after each epoch, on the {result.n_val_queries} "
        f"validation queries (reference captions of the val items, `data/{result.task}/qrels_val.tsv`), the best "
        "epoch kept and early stopping after `patience` epochs without improvement. No test query, test qrels "
        f"(`data/{result.task}/qrels.tsv`) or test metric was read.",
        "",
        f"Rule: {result.rule}. Budget: {result.budget_seconds:g} s per training. Seconds measured on "
        f"{result.device} with {result.threads} torch thread(s).",
        "",
        f"**Chosen: {name}** `{json.dumps(result.chosen_overrides, sort_keys=True)}` ({result.note}), i.e.",
        "",
        "```yaml",
        "grid:",
        f"  train: {{{', '.join(f'{k}: {v}' for k, v in result.schedule.items())}}}",
        "```",
        "",
        _markdown(t[shown]),
        "",
        "Validation R@1 per epoch: `curves.tsv` and `curves.png`; every candidate's overrides and effective "
        "settings: `tuning.tsv`. Measurements (seconds, cache hits) are in `tuning.timings.tsv` and "
        "`curves.timings.tsv`; `train_seconds` is the sum of the epochs' training seconds (validation passes "
        "excluded; `wall_seconds` is the whole call, near 0 on a cache hit).",
    ]
    if command:
        lines += ["", "Produced by:", "", "```sh", command, "```"]
    return "\n".join(lines) + "\n"
