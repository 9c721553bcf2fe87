"""`cart-stage STAGE [--task TASK] [--variant NAME]`: run one pipeline stage's notebook through papermill.

This is the command every DVC stage calls. It validates params.yaml and the task first (a clear
error before any expensive work), then executes `notebooks/NN_<stage>.ipynb` with the injected
*where* parameters (task, variant, repository root) and writes the executed notebook to
`results/<stage>/<task>[/<variant>]/NN_<stage>.ipynb` (`results/<stage>/` for the stages that
span all tasks) via a temp file, renamed when the run succeeded. Hyperparameters are never
injected: they come from params.yaml alone, so DVC tracks them.

Per-task stages: data, features, captions, identifiers, train, evaluate, baselines, tsne, and the grid
of generative rows (the paper's ablations, the identifier schemes, the fusion controls, the sweeps):
`ablations --task TASK --variant ROW` (a row of params.yaml `ablations.rows`, on a task of
`ablations.tasks`). Whole-suite stages: throughput,
report.

A failed stage leaves nothing that looks current, run by DVC or by hand: before the notebook runs,
the stage's previous results are removed (`stage_outputs`: `results/<stage>/<task>/`, only the
row's own folder for ablations, `results/throughput/`, and for report `results/report/`,
`results/REPORT.md`, `results/tables/`), except the inputs that live there (`KEEP`). After a
failure the folder holds only the failed notebook (`*.failed.ipynb`) and `FAILED.md` (stage, task,
variant, the exception, the time); a success removes both. The executed notebook is normalised
(`cartlib.notebook_io.normalise_notebook`: no timestamps, durations or progress-bar rates) before
the rename, so an unchanged rerun writes the same bytes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

STAGES = {
    "data": "01_data.ipynb",
    "features": "02_features.ipynb",
    "captions": "02b_captions.ipynb",
    "identifiers": "03_identifiers.ipynb",
    "train": "04_train.ipynb",
    "evaluate": "05_evaluate.ipynb",
    "baselines": "05b_baselines.ipynb",
    "ablations": "06_ablations.ipynb",
    "tsne": "07_tsne.ipynb",
    "throughput": "08_throughput.ipynb",
    "report": "09_report.ipynb",
}
TASK_STAGES = {"data", "features", "captions", "identifiers", "train", "evaluate", "baselines", "tsne", "ablations"}
VARIANT_STAGES = {"ablations"}  # need --variant
# inputs that live among a stage's results and survive its clearing (a GPU run's rows, committed by hand)
KEEP = {"throughput": ("throughput_gpu.csv",)}
FAILURE_NOTE = "FAILED.md"


class StageOutputs(NamedTuple):
    folder: Path  # where the executed notebook (or the failed one, and FAILED.md) goes
    clear: tuple[Path, ...]  # folders and files removed before the stage runs
    keep: tuple[str, ...]  # names inside `clear` folders that are inputs, never removed


def stage_outputs(stage: str, *, root: Path, where: str = "", variant: str | None = None) -> StageOutputs:
    """What a run of `stage` owns under results/ (the folder of its task/variant, or the suite's files)."""
    res = root / "results"
    folder = res / stage / where / (variant or "")
    extra = (res / "REPORT.md", res / "tables") if stage == "report" else ()
    return StageOutputs(folder, (folder, *extra), KEEP.get(stage, ()))


def clear_outputs(outputs: StageOutputs, *, spare: tuple[Path, ...] = ()) -> None:
    """Remove a stage's previous results (not its `keep` inputs, nor the paths in `spare`)."""
    for path in outputs.clear:
        if path.is_dir():
            for child in path.iterdir():
                if child.name in outputs.keep or child in spare:
                    continue
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif path.exists() or path.is_symlink():
            path.unlink()


def _failure_note(*, stage: str, where: str, variant: str | None, error: BaseException, notebook: Path | None) -> str:
    """FAILED.md: what failed, how, and when (a failure needs no stable bytes)."""
    # papermill's error carries the notebook's exception as ename/evalue; its str() is the whole traceback
    name, value = getattr(error, "ename", type(error).__name__), getattr(error, "evalue", str(error))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"# FAILED: stage `{stage}`" + (f", task `{where}`" if where else "") + (f", variant `{variant}`" if variant else ""),
             "", f"- when: {when}", f"- exception: `{name}: {value}`",
             f"- traceback: in `{notebook.name}`" if notebook is not None else
             "- traceback:\n\n```\n" + "".join(traceback.format_exception(error)).strip()[-4000:] + "\n```",
             "", "The previous results of this stage were removed before it ran: rerun the stage to get them back.", ""]
    return "\n".join(lines)


def notebook_for(stage: str, root: Path) -> Path:
    return root / "notebooks" / STAGES[stage]


def run_stage(stage: str, task: str | None = None, *, variant: str | None = None, root: str | os.PathLike = ".",
              params_file: str = "params.yaml", log_output: bool = False) -> Path:
    from cartlib import io
    from cartlib.config import ConfigError, check_task, load_params

    root = Path(root).resolve()
    if stage not in STAGES:
        raise SystemExit(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
    params = load_params(root / params_file)  # strict: unknown keys raise here
    if stage in TASK_STAGES:
        if not task:
            raise ConfigError(f"stage {stage!r} needs --task (one of {list(params.base.tasks)})")
        check_task(task, params)
    elif task:
        raise ConfigError(f"stage {stage!r} spans all tasks; it takes no --task (got {task!r})")
    if stage in VARIANT_STAGES:
        if not variant:
            raise ConfigError(f"stage {stage!r} needs --variant")
        _check_variant(stage, variant, params, task)
    elif variant:
        raise ConfigError(f"stage {stage!r} takes no --variant (got {variant!r})")
    import papermill as pm  # imported after validation: a bad params.yaml fails in well under a second

    from cartlib.notebook_io import normalise_notebook

    where = task or ""
    outputs = stage_outputs(stage, root=root, where=where, variant=variant)
    out = outputs.folder / STAGES[stage]
    failed = out.with_suffix(".failed.ipynb")
    note = outputs.folder / FAILURE_NOTE
    clear_outputs(outputs)  # nothing of the previous run may pass for this run's result
    try:
        with io.atomic_path(out) as tmp:
            try:
                pm.execute_notebook(str(notebook_for(stage, root)), str(tmp),
                                    parameters={"task": task or "", "root": ".", **({"variant": variant} if variant else {})}, kernel_name="python3",
                                    # the kernel runs in `root`: "." keeps the run record free of this machine's path
                                    cwd=str(root), log_output=log_output, progress_bar=False)
            except pm.PapermillExecutionError:
                # keep the traceback for the reader, under a name that cannot pass for a result
                os.replace(tmp, failed)
                raise
            nb = normalise_notebook(io.read_json(tmp), input_path=notebook_for(stage, root).relative_to(root).as_posix(),
                                    output_path=out.relative_to(root).as_posix())
            io.write_notebook(tmp, nb)
    except BaseException as e:
        # what the failed run wrote before it stopped must not pass for a result either
        clear_outputs(outputs, spare=(failed,))
        io.write_text(note, _failure_note(stage=stage, where=where, variant=variant, error=e,
                                          notebook=failed if failed.exists() else None))
        raise
    failed.unlink(missing_ok=True)
    note.unlink(missing_ok=True)
    return out


def _check_variant(stage: str, variant: str, params, task: str | None = None) -> None:
    from cartlib.config import ConfigError

    if stage == "ablations" and task not in params.ablations.tasks:
        raise ConfigError(f"ablations --task {task!r}: not one of params.yaml ablations.tasks {list(params.ablations.tasks)}")
    if stage == "ablations" and variant not in params.ablations.rows:
        raise ConfigError(f"ablations --variant {variant!r}: not a row of params.yaml ablations.rows "
                          f"(rows: {sorted(params.ablations.rows)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cart-stage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES), help="pipeline stage to run")
    parser.add_argument("--task", help="image, audio or video (per-task stages)")
    parser.add_argument("--variant", help="ablation row (ablations): a row of params.yaml ablations.rows")
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument("--params", default="params.yaml", help="params file relative to the root")
    parser.add_argument("--log-output", action="store_true", help="stream the notebook's output")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cartlib.config import ConfigError

    try:
        path = run_stage(args.stage, args.task, variant=args.variant, root=args.root, params_file=args.params, log_output=args.log_output)
    except ConfigError as e:
        print(f"cart-stage: {e}", file=sys.stderr)
        return 2
    print(f"cart-stage: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
