"""`cart-stage STAGE --task TASK`: run one pipeline stage's notebook through papermill.

This is the command every DVC stage calls. It validates params.yaml and the task first (a clear
error before any expensive work), then executes `notebooks/NN_<stage>.ipynb` with the injected
*where* parameters (task, repository root) and writes the executed notebook to
`results/<stage>/<task>/NN_<stage>.ipynb` (via a temp file, renamed when the run succeeded).
Hyperparameters are never injected: they come from params.yaml alone, so DVC tracks them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STAGES = {
    "data": "01_data.ipynb",
    "features": "02_features.ipynb",
    "identifiers": "03_identifiers.ipynb",
    "train": "04_train.ipynb",
    "evaluate": "05_evaluate.ipynb",
}


def notebook_for(stage: str, root: Path) -> Path:
    return root / "notebooks" / STAGES[stage]


def run_stage(stage: str, task: str, *, root: str | os.PathLike = ".", params_file: str = "params.yaml",
              log_output: bool = False) -> Path:
    from cartlib import io
    from cartlib.config import check_task, load_params

    root = Path(root).resolve()
    if stage not in STAGES:
        raise SystemExit(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
    params = load_params(root / params_file)  # strict: unknown keys raise here
    check_task(task, params)
    import papermill as pm  # imported after validation: a bad params.yaml fails in well under a second

    out = root / "results" / stage / task / STAGES[stage]
    failed = out.with_suffix(".failed.ipynb")
    with io.atomic_path(out) as tmp:
        try:
            pm.execute_notebook(str(notebook_for(stage, root)), str(tmp),
                                parameters={"task": task, "root": str(root)}, kernel_name="python3",
                                cwd=str(root), log_output=log_output, progress_bar=False)
        except pm.PapermillExecutionError:
            # keep the traceback for the reader, under a name that cannot pass for a result
            os.replace(tmp, failed)
            raise
    failed.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cart-stage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES), help="pipeline stage to run")
    parser.add_argument("--task", required=True, help="image, audio or video")
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument("--params", default="params.yaml", help="params file relative to the root")
    parser.add_argument("--log-output", action="store_true", help="stream the notebook's output")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cartlib.config import ConfigError

    try:
        path = run_stage(args.stage, args.task, root=args.root, params_file=args.params, log_output=args.log_output)
    except ConfigError as e:
        print(f"cart-stage: {e}", file=sys.stderr)
        return 2
    print(f"cart-stage: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
