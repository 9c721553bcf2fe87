"""Choose the ablation grid's schedule (`params.yaml` `grid.train`) on validation queries only.

Trains the grid's `full` row (first seed, as stage `ablations` does, sharing its model cache) once per
candidate schedule, reads validation recall@1 per epoch, picks one by the rule in `cartlib/tuning.py`
and writes `<out>/<task>/` (tuning.tsv, curves.tsv, curves.png, README.md). Never reads test queries
or `data/<task>/qrels.tsv`. Needs the task's data, features, identifiers and pseudo-captions:

    dvc repro identifiers@image captions@image
    .venv/bin/python scripts/tune_grid.py --task image
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub lookups
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def read_candidates(path: str | Path) -> list[dict]:
    """A YAML or JSON file: a list of mappings of `train` overrides, or `{candidates: [...]}`."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path}: candidates file not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    if isinstance(raw, dict) and "candidates" in raw:
        raw = raw["candidates"]
    if not isinstance(raw, list) or not raw or not all(isinstance(c, dict) for c in raw):
        raise SystemExit(f"{path}: expected a non-empty list of mappings of train overrides "
                         "(or a mapping with key `candidates` holding one)")
    return raw


def parser() -> argparse.ArgumentParser:
    from cartlib.tuning import DEFAULT_BUDGET_SECONDS, DEFAULT_CANDIDATES, RULE

    defaults = "\n".join(f"  {json.dumps(c, sort_keys=True)}" for c in DEFAULT_CANDIDATES)
    p = argparse.ArgumentParser(
        prog="scripts/tune_grid.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1],
        epilog=f"Default candidates (overrides of train, laid over params.yaml grid.train):\n{defaults}\n\n"
               f"Rule: {RULE}.")
    p.add_argument("--task", default="image", help="task to tune on (default: image, the task the grid ablates)")
    p.add_argument("--candidates", default=None, metavar="FILE",
                   help="YAML/JSON file: a list of mappings of train overrides, e.g. "
                        "[{d_model: 128, lr: 0.002, max_train_items: 1000}] (default: the built-in list below)")
    p.add_argument("--budget-seconds", type=float, default=DEFAULT_BUDGET_SECONDS,
                   help="most training seconds a candidate may take to be chosen (default: %(default)g)")
    p.add_argument("--root", default=".", help="repository root holding data/ and models/ (default: .)")
    p.add_argument("--out", default="results/tuning", help="output folder; <out>/<task>/ is written "
                                                          "(default: results/tuning, relative to --root)")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml, relative to --root)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    from cartlib.config import ConfigError, load_params
    from cartlib.tuning import DEFAULT_CANDIDATES, MissingInputError, tune, write_tuning

    root = Path(args.root)
    params_path = Path(args.params) if Path(args.params).is_absolute() else root / args.params
    out = Path(args.out) if Path(args.out).is_absolute() else root / args.out
    candidates = read_candidates(args.candidates) if args.candidates else [dict(c) for c in DEFAULT_CANDIDATES]
    try:
        params = load_params(params_path)
        result = tune(params, root, task=args.task, candidates=candidates, budget_seconds=args.budget_seconds,
                      progress=not args.no_progress)
    except (ConfigError, MissingInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/tune_grid.py", *argv])
    written = write_tuning(result, out, command=command)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30):
        cols = ["candidate", "label", "trainable_params", "epochs_trained", "best_epoch", "val_recall_at_1",
                "train_seconds", "fits_budget", "chosen"]
        print(result.table[cols].to_string(index=False))
    print(f"\nchosen: {result.table['candidate'].iloc[result.chosen]} "
          f"{json.dumps(result.chosen_overrides, sort_keys=True)} ({result.note})")
    print(f"grid.train → {json.dumps(result.schedule, sort_keys=True)}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
