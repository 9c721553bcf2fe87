"""The ablation grid on DVC's experiment queue: queue one experiment per row, run N at a time, collect.

    .venv/bin/python scripts/queue_grid.py queue [ROW | TASK-ROW ...] [--force] [--set KEY=VALUE ...]
    .venv/bin/python scripts/queue_grid.py start --jobs 2      # returns when the queue is empty
    .venv/bin/dvc exp show --only-changed                      # the numbers, one line per experiment
    .venv/bin/python scripts/queue_grid.py collect [NAME ...]  # every experiment's results → workspace
    .venv/bin/dvc repro report                                 # or `collect --repro`

`queue` runs ``dvc exp run --queue -n <prefix><task>-<row> ablations@<task>-<row>`` for each row
(default: every row of ``ablations.rows`` on every task of ``ablations.tasks``; a bare ROW means that
row on every task of ``ablations.tasks``). ``--force`` reruns rows whose inputs did not change (``-f -s``: the row
alone, its upstream outputs are checked out from the cache, never rerun); ``--set`` passes ``-S``.

`start` runs ``dvc queue start --jobs N`` with this interpreter's ``bin`` folder first on PATH: DVC
spawns its queue workers as ``dvc exp queue-worker`` found on PATH, and the workers run the stage
commands (``cart-stage …``) with the PATH they inherited, so from a shell where no virtualenv is
active both must come from the venv, as ``make reproduce`` arranges for ``dvc repro``. Environment
variables a stage reads (``MLFLOW_TRACKING_URI``, ``CART_GPU_LOCK_DIR``, ``CUDA_VISIBLE_DEVICES``)
are likewise those of the shell that *starts the workers*, not the one that queued. It then waits
until no experiment is queued or running (``--no-wait``: return at once; `wait` waits later) and
exits 1 if one failed, showing the end of its log (``dvc queue logs``).

`collect` brings the results of several experiments into the workspace at once. ``dvc exp apply``
applies ONE experiment: it writes that experiment's whole ``dvc.lock`` and files, so applying a
second experiment silently puts the first row back to the baseline. `collect` instead takes, from
every experiment of the current commit (or those named), only what it changed relative to that
commit: changed files are copied, ``dvc.lock`` is merged stage by stage (the entries of the stages
the experiment ran) and params files key by key, written the way DVC writes them; outputs kept in
the DVC cache are then checked out. It refuses, and changes nothing, when two experiments changed
the same file, stage or param differently, or when the workspace changed one of them since the
commit. Afterwards ``dvc status`` lists what depends on the collected rows: ``report`` depends on
the folder ``results/ablations`` and so on each row's ``timings.json`` (``--repro`` reruns it).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

STAGE = "ablations"
LOCK = "dvc.lock"
PARAM_FILES = ("params.yaml",)  # merged key by key (`dvc exp run -S` edits them)
_MISSING = object()  # a key or file an experiment deleted
BIN = Path(sys.executable).parent  # the venv's bin: dvc, cart-stage


class CollectError(RuntimeError):
    """Two experiments (or an experiment and the workspace) changed the same thing differently."""


def dvc(*args: str, root: Path, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    """``dvc ARGS`` from this venv, with the venv's bin first on PATH (workers and stage commands need it)."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    return subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env, check=check, text=True,
                          capture_output=capture)


def git(*args: str, root: Path, binary: bool = False) -> Any:
    out = subprocess.run(["git", *args], cwd=root, check=True, capture_output=True).stdout
    return out if binary else out.decode()


# --------------------------------------------------------------------------------------------- queue
def grid_rows(root: Path, rows: Iterable[str] = ()) -> list[str]:
    """The stage items ``<task>-<row>`` of ``rows`` (default: every row of ``ablations.rows``) on every
    task of ``ablations.tasks``; an item already naming its task is kept as it is."""
    import yaml

    ablations = yaml.safe_load((root / "params.yaml").read_text())["ablations"]
    tasks = list(ablations.get("tasks") or [])
    items = []
    for row in list(rows) or list(ablations["rows"]):
        items += [row] if any(row.startswith(f"{t}-") for t in tasks) else [f"{t}-{row}" for t in tasks]
    return items


def queue_commands(rows: Iterable[str], *, force: bool = False, sets: Iterable[str] = (), prefix: str = "",
                   stage: str = STAGE) -> list[list[str]]:
    """The ``dvc exp run --queue`` argument lists, one experiment per row."""
    sets = list(sets)
    if force and sets:
        raise SystemExit("--force reruns each row alone (dvc exp run -f -s), on the upstream outputs of this commit; "
                         "it cannot be combined with --set: a changed param reruns what depends on it by itself")
    cmds = []
    for row in rows:
        cmd = ["exp", "run", "--queue", "-n", f"{prefix}{row}"]
        cmd += ["-f", "-s"] if force else []
        for s in sets:
            cmd += ["-S", s]
        cmds.append([*cmd, f"{stage}@{row}"])
    return cmds


# --------------------------------------------------------------------------------------------- start / wait
_STATES = ("Queued", "Running", "Success", "Failed")


def queue_status(root: Path) -> list[tuple[str, str, str]]:
    """(task id, name, status) of every task ``dvc queue status`` lists."""
    out = dvc("queue", "status", root=root).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] in _STATES:
            rows.append((parts[0], parts[1], parts[-1]))
    return rows


def wait(root: Path, *, poll: float = 10.0, timeout: float | None = None) -> list[tuple[str, str, str]]:
    """Block until no task is queued or running; returns the final status list."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        status = queue_status(root)
        pending = [(n, s) for _, n, s in status if s in ("Queued", "Running")]
        summary = ", ".join(f"{s}: {sum(1 for *_, x in status if x == s)}" for s in _STATES)
        if summary != last:
            print(f"queue: {summary}", flush=True)
            last = summary
        if not pending:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"queue still busy after {timeout:.0f} s: {pending}")
        time.sleep(poll)


def report_failures(root: Path, status: list[tuple[str, str, str]], *, known: set[str] = frozenset()) -> int:
    """Show the log end of each failed task (those not in ``known``: failed before); 1 if there is one."""
    failed = [(task, name) for task, name, s in status if s == "Failed" and task not in known]
    for task, name in failed:
        log = dvc("queue", "logs", task, root=root, check=False)
        print(f"--- experiment {name} failed; end of `dvc queue logs {task}`:\n{(log.stdout + log.stderr)[-3000:]}")
    if failed:
        print("(`dvc queue remove --failed` clears them from `dvc queue status`)")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------- collect
def experiments(root: Path, names: Iterable[str] = ()) -> dict[str, str]:
    """{name: commit} of the experiments whose baseline is HEAD (all of them, or ``names``)."""
    head = git("rev-parse", "HEAD", root=root).strip()
    prefix = f"refs/exps/{head[:2]}/{head[2:]}/"
    found = {}
    for line in git("for-each-ref", "--format=%(refname) %(objectname)", prefix, root=root).splitlines():
        ref, sha = line.split()
        found[ref[len(prefix):]] = sha
    names = list(names)
    if missing := [n for n in names if n not in found]:
        raise CollectError(f"no experiment {missing} on this commit ({head[:7]}); `dvc exp list` lists them")
    return {n: found[n] for n in names} if names else found


def changed_paths(root: Path, base: str, rev: str) -> list[str]:
    out = git("diff", "--name-only", "--no-renames", "-z", base, rev, root=root)
    return [p for p in out.split("\0") if p]


def blob(root: Path, rev: str, path: str) -> bytes | object:
    try:
        return git("cat-file", "blob", f"{rev}:{path}", root=root, binary=True)
    except subprocess.CalledProcessError:
        return _MISSING


def leaves(data: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested mappings → {key path: value}; lists and scalars are leaves."""
    if isinstance(data, Mapping) and (data or not prefix):
        out: dict[tuple, Any] = {}
        for k, v in data.items():
            out.update(leaves(v, (*prefix, k)))
        return out
    return {prefix: data}


def merge(base: Mapping, work: Mapping, changes: Mapping[str, Mapping], what: str) -> dict:
    """Three-way merge by key: ``changes`` = {experiment: {key: new value}} relative to ``base``.

    Returns {key: value} to write; raises `CollectError` when experiments disagree on a key or the
    workspace (``work``) changed a key since ``base``."""
    out: dict = {}
    by: dict = {}
    for exp, delta in changes.items():
        for key, value in delta.items():
            if key in out and out[key] != value:
                raise CollectError(f"experiments {by[key]} and {exp} changed {what} {_show(key)} differently; "
                                   "collect them one at a time (name them)")
            out[key], by[key] = value, exp
    for key, value in out.items():
        if work.get(key, _MISSING) not in (base.get(key, _MISSING), value):
            raise CollectError(f"{what} {_show(key)} changed in the workspace since the experiments' commit; "
                               "commit or undo that change first")
    return out


def _show(key) -> str:
    return ".".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _delta(base: Mapping, new: Mapping) -> dict:
    return {k: new.get(k, _MISSING) for k in set(base) | set(new) if new.get(k, _MISSING) != base.get(k, _MISSING)}


def _yaml(text: bytes | object) -> Any:
    from dvc.utils.serialize import loads_yaml

    return {} if text is _MISSING else (loads_yaml(text.decode()) or {})


def _set_leaf(data: Any, key: tuple, value: Any) -> None:
    *parents, last = key
    for k in parents:
        data = data.setdefault(k, {})
    if value is _MISSING:
        data.pop(last, None)
    else:
        data[last] = value


def collect(root: Path, names: Iterable[str] = (), *, dry_run: bool = False) -> dict[str, list[str]]:
    """Bring what the experiments changed into the workspace; returns {experiment: [stages collected]}."""
    from dvc.utils.serialize import modify_yaml, parse_yaml_for_update

    root = Path(root).resolve()
    base = git("rev-parse", "HEAD", root=root).strip()
    exps = experiments(root, names)
    if not exps:
        raise CollectError("no experiment on this commit to collect (`dvc exp list`)")
    file_changes: dict[str, dict] = {}
    lock_changes: dict[str, dict] = {}
    param_changes: dict[str, dict[str, dict]] = {p: {} for p in PARAM_FILES}
    lock_entries: dict[tuple[str, str], Any] = {}  # (experiment, stage) → its entry, read by DVC's round-trip parser
    base_lock = _yaml(blob(root, base, LOCK)).get("stages", {})
    for name, rev in exps.items():
        paths = changed_paths(root, base, rev)
        file_changes[name] = {p: blob(root, rev, p) for p in paths if p != LOCK and p not in PARAM_FILES}
        if LOCK in paths:
            text = blob(root, rev, LOCK)
            lock_changes[name] = _delta(base_lock, _yaml(text).get("stages", {}))
            rt = parse_yaml_for_update(text.decode(), LOCK)["stages"]
            lock_entries.update({(name, s): rt.get(s, _MISSING) for s in lock_changes[name]})
        for p in PARAM_FILES:
            if p in paths:
                param_changes[p][name] = _delta(leaves(_yaml(blob(root, base, p))), leaves(_yaml(blob(root, rev, p))))
    # check everything before writing anything
    work_files = {p: (root / p).read_bytes() if (root / p).is_file() else _MISSING
                  for delta in file_changes.values() for p in delta}
    base_files = {p: blob(root, base, p) for p in work_files}
    files = merge(base_files, work_files, file_changes, "file")
    work_lock = _yaml((root / LOCK).read_bytes() if (root / LOCK).exists() else _MISSING).get("stages", {})
    stages = merge(base_lock, work_lock, lock_changes, "dvc.lock stage")
    params = {}
    for p, changes in param_changes.items():
        if changes:
            work = leaves(_yaml((root / p).read_bytes() if (root / p).exists() else _MISSING))
            params[p] = merge(leaves(_yaml(blob(root, base, p))), work, changes, f"{p} key")
    summary = {name: sorted(lock_changes.get(name, {})) for name in exps}
    if dry_run:
        return summary
    for p, content in files.items():
        target = root / p
        if content is _MISSING:
            target.unlink(missing_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    for p, values in params.items():
        with modify_yaml(root / p) as data:
            rt = {name: parse_yaml_for_update(blob(root, exps[name], p).decode(), p) for name in param_changes[p]}
            for key, value in values.items():
                owner = next(n for n, d in param_changes[p].items() if key in d)
                _set_leaf(data, key, value if value is _MISSING else _get(rt[owner], key))
    if stages:
        with modify_yaml(root / LOCK) as data:
            data.setdefault("stages", {})
            for stage in stages:
                owner = next(n for n, d in lock_changes.items() if stage in d)
                entry = lock_entries[(owner, stage)]
                if entry is _MISSING:
                    data["stages"].pop(stage, None)
                else:
                    data["stages"][stage] = entry
        live = [s for s, e in stages.items() if e is not _MISSING]
        if live:  # outputs kept in the DVC cache (cache: true) come from there, as after `dvc exp apply`
            dvc("checkout", *live, root=root)
    return summary


def _get(data: Any, key: tuple) -> Any:
    for k in key:
        data = data[k]
    return data


# --------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="queue_grid.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See docs/parallel.md.")
    ap.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: the current folder)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("queue", help="queue one experiment per ablation row (dvc exp run --queue)")
    q.add_argument("rows", nargs="*", help="rows of ablations.rows, each on every task of ablations.tasks, or "
                   "TASK-ROW items (default: every row on every task)")
    q.add_argument("--force", action="store_true", help="rerun rows whose inputs did not change (-f -s)")
    q.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a param override for every queued row (dvc exp run -S); repeatable")
    q.add_argument("--prefix", default="", help="experiment name prefix (names are <prefix><row>)")
    q.add_argument("--stage", default=STAGE, help=f"the foreach stage whose items are queued (default {STAGE}; "
                   "ROWs are then required, as that stage's item names)")
    q.add_argument("--dry-run", action="store_true", help="print the dvc commands only")
    s = sub.add_parser("start", help="dvc queue start --jobs N with the venv on PATH, then wait")
    s.add_argument("--jobs", "-j", type=int, default=2, help="queue workers = experiments at a time (default 2)")
    s.add_argument("--no-wait", action="store_true", help="return once the workers are started")
    s.add_argument("--poll", type=float, default=10.0, help="seconds between status checks (default 10)")
    w = sub.add_parser("wait", help="wait until nothing is queued or running; exit 1 if an experiment failed")
    w.add_argument("--poll", type=float, default=10.0)
    c = sub.add_parser("collect", help="bring the results of every experiment of HEAD (or NAMES) into the workspace")
    c.add_argument("names", nargs="*", help="experiment names (default: all of the current commit)")
    c.add_argument("--dry-run", action="store_true", help="check and list what would be collected")
    c.add_argument("--repro", action="store_true",
                   help="then `dvc repro` (with the venv on PATH): the stages downstream of the rows, e.g. report")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if args.cmd == "queue":
        if not args.rows and args.stage != STAGE:
            ap.error(f"name the items of stage {args.stage} to queue")
        if subprocess.run(["git", "ls-files", "--error-unmatch", LOCK], cwd=root, capture_output=True).returncode:
            print(f"queue: {LOCK} is not committed: an experiment starts from the last commit (plus changes to "
                  "tracked files), so commit dvc.lock and results/ first", file=sys.stderr)
            return 1
        rows = grid_rows(root, args.rows) if args.stage == STAGE else args.rows
        for cmd in queue_commands(rows, force=args.force, sets=args.sets, prefix=args.prefix, stage=args.stage):
            print("dvc " + shlex.join(cmd), flush=True)
            if not args.dry_run and dvc(*cmd, root=root, check=False, capture=False).returncode:
                return 1
        return 0
    if args.cmd == "start":
        known = {task for task, _, state in queue_status(root) if state == "Failed"}
        if dvc("queue", "start", "--jobs", str(args.jobs), root=root, check=False, capture=False).returncode:
            return 1
        return 0 if args.no_wait else report_failures(root, wait(root, poll=args.poll), known=known)
    if args.cmd == "wait":
        return report_failures(root, wait(root, poll=args.poll))
    try:
        summary = collect(root, args.names, dry_run=args.dry_run)
    except CollectError as e:
        print(f"collect: {e}", file=sys.stderr)
        return 1
    for name, stages in summary.items():
        print(f"{'would collect' if args.dry_run else 'collected'} {name}: {', '.join(stages) or '(no stage changed)'}")
    if args.dry_run:
        return 0
    if args.repro and dvc("repro", root=root, check=False, capture=False).returncode:
        return 1
    print(dvc("status", root=root).stdout.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
