"""Which `cartlib` modules a piece of the suite imports, and a fingerprint of their source.

Two consumers: the DVC stage dependencies (`scripts/dvc_deps.py` writes them into `dvc.yaml`; a
test fails when they drift from the imports) and the caches of trained weights (a checkpoint or
reused model is keyed by the fingerprint of the code that produced it, so an edit of a model
source file is never silently ignored).

The graph is read statically with `ast` (every `import`/`from … import` anywhere in a module,
function-level imports included), so nothing is executed and the answer is the same on any machine.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable

PACKAGE = "cartlib"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_path(module: str, *, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """`cartlib.ids.prefix` → `<package_dir>/ids/prefix.py` (or the package's `__init__.py`); None if absent."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PACKAGE, *parts])


def direct_imports(path: Path, *, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """The `cartlib` modules that the file at `path` names in any import statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    here = _module_name(path, package_dir).split(".") if path.is_relative_to(package_dir) else [PACKAGE]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                anchor = here if is_package else here[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            found.add(base)
            # `from cartlib.ids import kmeans` imports the submodule `cartlib.ids.kmeans`
            found.update(f"{base}.{a.name}" for a in node.names if module_path(f"{base}.{a.name}", package_dir=package_dir))
    return {m for m in found if module_path(m, package_dir=package_dir)}


def _with_parents(module: str) -> list[str]:
    """Importing `cartlib.a.b` runs `cartlib/__init__.py` and `cartlib/a/__init__.py` first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(modules: Iterable[str], *, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every `cartlib` module that importing `modules` can load (transitively), sorted."""
    return list(_closure(tuple(sorted(set(modules))), package_dir))


@lru_cache(maxsize=None)
def _closure(modules: tuple[str, ...], package_dir: Path) -> tuple[str, ...]:
    seen: set[str] = set()
    todo = [p for m in modules for p in _with_parents(m)]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = module_path(mod, package_dir=package_dir)
        if path is None:
            raise ModuleNotFoundError(f"{mod}: no such module under {package_dir}")
        seen.add(mod)
        for dep in direct_imports(path, package_dir=package_dir):
            todo.extend(p for p in _with_parents(dep) if p not in seen)
    return tuple(sorted(seen))


def module_files(modules: Iterable[str], *, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    return [module_path(m, package_dir=package_dir) for m in modules]  # type: ignore[misc]


def code_fingerprint(modules: Iterable[str], *, package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 over the source of `modules` and everything they import (names and bytes), 16 hex digits.

    An edit of any of those files, even one that keeps every parameter name, changes it.
    """
    h = hashlib.sha256()
    for mod in import_closure(modules, package_dir=package_dir):
        h.update(mod.encode() + b"\0")
        h.update(module_path(mod, package_dir=package_dir).read_bytes() + b"\0")  # type: ignore[union-attr]
    return h.hexdigest()[:16]
