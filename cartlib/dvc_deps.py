"""DVC stage dependencies generated from the code: `python -m cartlib.dvc_deps [--check]`.

For each stage of `dvc.yaml` this computes
- the code it runs: its notebook and every `cartlib` module that the notebook and `cart-stage`
  import, transitively (`cartlib.codegraph`, read statically: lazily imported modules count, since
  a params change can route a run through them);
- the params it reads: every `params.<section>[.<key>]` (or `p.<section>…`) in that code, at the
  finest level written there, plus `base.scale` (it selects the `smoke:` overrides) and the
  `smoke.<section>[.<key>]` entries of params.yaml that override what it reads;
and rewrites those two lists in `dvc.yaml`, keeping its data dependencies, outputs and templated
params (`${…}`). A test recomputes both and fails when `dvc.yaml` and the code disagree, so an
edit that adds an import cannot leave the lock lying, and an edit outside a stage's closure
provably cannot change what it computed (the README's `dvc commit` recipe relies on that).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from cartlib import codegraph
from cartlib.cli import STAGES
from cartlib.config import SECTIONS

HEADER = """\
# One stage per notebook, fanned out over the tasks. Each stage runs `cart-stage`, which executes the
# notebook with papermill; hyperparameters come from params.yaml only (listed under params).
# The `cartlib/` and `notebooks/` dependencies and the params lists are GENERATED from the imports and
# the params each stage's code reads: after changing imports run `python -m cartlib.dvc_deps`
# (tests/test_dvc_deps.py fails while they disagree). Everything else here is edited by hand.
"""
# Params that a stage reads per fan-out item: the generated entry is replaced by the templated one.
NARROWED = {"ablations": {"ablations.rows": "ablations.rows.${item.row}"}}
# Params a stage's code reads only to validate its arguments (a row's task must be listed): a new
# task in the list must not rerun the rows of the others.
UNREAD = {"ablations": {"ablations.tasks"}}
# Modules that read params only to validate or to log them: what they read does not change a result.
NOT_SCANNED = {"cartlib/config.py", "cartlib/cli.py", "cartlib/results.py", "cartlib/tracking.py"}
_ACCESS = re.compile(r"\b(?:params|p)\.(" + "|".join(SECTIONS) + r")\b(?:\.([a-z_]\w*))?")


class StageDeps(NamedTuple):
    code: list[str]  # notebook + module files, relative to the repository root, sorted
    params: list[str]  # params.yaml keys (dotted), sorted


def notebook_source(path: Path) -> str:
    """The code cells of a notebook, IPython magics and shell lines dropped."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            lines += [ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def _imports(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] == codegraph.PACKAGE and codegraph.module_path(m)}


def params_read(sources: list[str], smoke: dict[str, Any]) -> list[str]:
    """The params keys that `sources` read (see the module docstring for the rule)."""
    whole, keys = set(), set()
    for src in sources:
        for section, key in _ACCESS.findall(src):
            fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
            (keys.add(f"{section}.{key}") if key in fields else whole.add(section))
    keys = {k for k in keys if k.split(".")[0] not in whole}
    out = whole | keys | {"base.scale"}
    if "base" in whole:
        out.discard("base.scale")
    for section, over in (smoke or {}).items():
        if section in whole:
            out.add(f"smoke.{section}")
        else:
            out.update(f"smoke.{section}.{k}" for k in (over or {}) if f"{section}.{k}" in keys)
    return sorted(out)


def stage_deps(stage: str, root: Path, *, smoke: dict[str, Any]) -> StageDeps:
    notebook = root / "notebooks" / STAGES[stage]
    nb_source = notebook_source(notebook)
    modules = codegraph.import_closure(_imports(nb_source) | {"cartlib.cli"}, package_dir=root / "cartlib")
    files = codegraph.module_files(modules, package_dir=root / "cartlib")
    code = sorted([notebook.relative_to(root).as_posix()] + [f.relative_to(root).as_posix() for f in files])
    scanned = [f for f in files if f.relative_to(root).as_posix() not in NOT_SCANNED]
    params = params_read([nb_source] + [f.read_text(encoding="utf-8") for f in scanned], smoke)
    narrowed = NARROWED.get(stage, {})
    return StageDeps(code, sorted(narrowed.get(p, p) for p in params if p not in UNREAD.get(stage, ())))


def _is_code(dep: str) -> bool:
    return dep.startswith(("cartlib/", "notebooks/"))


def regenerate(dvc: dict, root: Path) -> dict:
    """`dvc` (the loaded dvc.yaml) with each stage's code deps and params replaced by the generated ones."""
    smoke = (yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}).get("smoke", {})
    out = dict(dvc)
    out["stages"] = {}
    for name, stage in dvc["stages"].items():
        stage = dict(stage)
        body = dict(stage.get("do", stage))
        deps = stage_deps(name, root, smoke=smoke)
        body["deps"] = [d for d in body.get("deps", []) if not _is_code(d)] + deps.code
        templated = [p for p in body.get("params", []) if isinstance(p, str) and "${" in p]
        body["params"] = deps.params + [p for p in templated if p not in deps.params]
        if "do" in stage:
            stage["do"] = body
        else:
            stage = body
        out["stages"][name] = stage
    return out


def dump(dvc: dict) -> str:
    return HEADER + yaml.safe_dump(dvc, sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cartlib.dvc_deps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument("--check", action="store_true", help="only report stages whose lists are out of date (exit 1)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    path = root / "dvc.yaml"
    current = yaml.safe_load(path.read_text(encoding="utf-8"))
    wanted = regenerate(current, root)
    stale = [n for n in current["stages"] if current["stages"][n] != wanted["stages"][n]]
    if args.check:
        for n in stale:
            print(f"dvc.yaml: stage {n!r}: code deps or params differ from its imports", file=sys.stderr)
        return 1 if stale else 0
    from cartlib import io

    io.write_text(path, dump(wanted))
    print(f"dvc.yaml: {len(stale)} stage(s) updated: {', '.join(stale) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
