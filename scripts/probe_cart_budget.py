"""Budget probe: does more training move CART's recall? (an experiment, not a pipeline stage)

Trains the generative model of the ``compare`` stage with the schedule given on the command line
(epochs, reference captions per train item, train items), evaluates it on a fixed subset of the
test queries, and prints it next to the main CART run and the dual-tower baseline on the very same
queries, with paired 95% intervals. Needs the default run's data/features/identifiers of the task
and `results/evaluate/<task>/run.tsv`. The model is cached under models/<task>/variants/ (a rerun
with the same schedule only evaluates); nothing under results/ is written.

    .venv/bin/python scripts/probe_cart_budget.py --task audio --epochs 5     # ~40 min on 2 cores
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402

from cartlib.config import ConfigError, check_task, load_params  # noqa: E402
from cartlib.paths import task_paths  # noqa: E402
from cartlib.report import hits_at_1, paired_delta  # noqa: E402
from cartlib.stages.variant import query_subset, run_variant  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="image | audio | video")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--refs-per-item", type=int, default=0, help="reference captions per train item (0 = all, as the default run)")
    ap.add_argument("--max-train-items", type=int, default=0, help="train items used (0 = all)")
    ap.add_argument("--n-queries", type=int, default=1000, help="test queries evaluated (0 = all)")
    args = ap.parse_args()
    params = load_params("params.yaml")
    try:
        task = check_task(args.task, params)
    except ConfigError as e:
        ap.error(str(e))
    for name in ("epochs", "refs_per_item", "max_train_items", "n_queries"):
        if getattr(args, name) < 0 or (name == "epochs" and args.epochs == 0):
            ap.error(f"--{name.replace('_', '-')} must be {'≥ 1' if name == 'epochs' else '≥ 0'}, got {getattr(args, name)}")
    root = Path(".").resolve()
    main_run = root / "results" / "evaluate" / task / "run.tsv"
    if not main_run.exists():
        ap.error(f"{main_run} not found: run `dvc repro evaluate@{task}` first")
    params = dataclasses.replace(params, compare=dataclasses.replace(
        params.compare, epochs=args.epochs, refs_per_item=args.refs_per_item,
        max_train_items=args.max_train_items, n_queries=args.n_queries))
    paths = task_paths(root, task)

    start = time.perf_counter()
    result = run_variant(params, paths, overrides={})
    print(f"probe: {result.metrics['n_train_texts']} training texts, {time.perf_counter() - start:.0f} s "
          f"(train + evaluate; model reused from the cache: {result.cache_hit})")

    from cartlib.data import schema

    dataset = schema.load_dataset(paths.dataset, verify_hashes=False)
    qrels = query_subset(schema.load_qrels(paths.qrels, dataset), args.n_queries, params.base.seed)
    probe_run = paths.models / "variants" / f"{result.model_key}.run.tsv"
    result.run.to_csv(probe_run, sep="\t", index=False)
    hits = {"probe": hits_at_1(probe_run, qrels), "CART main run": hits_at_1(main_run, qrels),
            "dual-tower": hits_at_1(root / "results" / "features" / task / "run.tsv", qrels)}
    rows = []
    for name, h in hits.items():
        d, half = paired_delta(hits["probe"], h)
        rows.append({"system": name, "recall_at_1": h.mean(), "probe_minus_this": d, "ci95": half})
    print(f"{task}, {len(qrels)} test queries, schedule: epochs {args.epochs}, refs/item {args.refs_per_item or 'all'}, "
          f"train items {args.max_train_items or 'all'}")
    print(pd.DataFrame(rows).round(4).to_string(index=False))


if __name__ == "__main__":
    main()
