"""The notebooks are their own source: each `notebooks/NN_x.ipynb` is paired (jupytext) with a
percent-format `notebooks/NN_x.py`, and both are committed, in sync and without outputs.

Fast: reads files only, starts no kernel. After editing either twin run
`.venv/bin/jupytext --sync notebooks/*.ipynb` (JupyterLab with jupytext does it on save).
"""
from __future__ import annotations

import ast
from pathlib import Path

import jupytext
import nbformat
import pytest
from jupytext.config import find_jupytext_configuration_file, load_jupytext_configuration_file

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
IPYNBS = sorted(NOTEBOOKS.glob("*.ipynb"))
IDS = [p.stem for p in IPYNBS]


def _cells(nb) -> list[tuple[str, str, list[str]]]:
    """What a pair must agree on: each cell's type, source and tags (the `parameters` tag above all)."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def assert_in_sync(ipynb: Path) -> None:
    twin = ipynb.with_suffix(".py")
    assert twin.is_file(), f"{ipynb.name} has no percent-format twin {twin.name}: run jupytext --sync"
    from_py = jupytext.read(twin, fmt="py:percent")
    from_ipynb = jupytext.read(ipynb)
    assert _cells(from_py) == _cells(from_ipynb), (
        f"{ipynb.name} and {twin.name} differ: run `.venv/bin/jupytext --sync {ipynb.relative_to(ROOT)}`")


def test_notebooks_exist():
    assert len(IPYNBS) >= 2, "no notebooks found"


def test_jupytext_config_pairs_ipynb_with_percent_py():
    path = find_jupytext_configuration_file(str(NOTEBOOKS))
    assert path is not None and Path(path).parent == ROOT, "jupytext.toml missing at the repository root"
    config = load_jupytext_configuration_file(path)
    for ipynb in IPYNBS:  # pairs without any per-notebook metadata, as JupyterLab with jupytext does
        assert config.default_formats(str(ipynb)) == "ipynb,py:percent"


@pytest.mark.parametrize("ipynb", IPYNBS, ids=IDS)
def test_pair_is_in_sync(ipynb):
    assert_in_sync(ipynb)


def test_every_py_twin_has_its_notebook():
    orphans = [p.name for p in NOTEBOOKS.glob("*.py") if not p.with_suffix(".ipynb").is_file()]
    assert not orphans, f"orphan .py twins (no .ipynb): {orphans}"


@pytest.mark.parametrize("ipynb", IPYNBS, ids=IDS)
def test_committed_without_outputs(ipynb):
    nb = nbformat.read(ipynb, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{ipynb.name}: cells {dirty} carry outputs or execution counts; clear them "
                       f"with `.venv/bin/jupyter nbconvert --clear-output --inplace notebooks/{ipynb.name}`")


@pytest.mark.parametrize("ipynb", IPYNBS, ids=IDS)
def test_exactly_one_parameters_cell_and_python3_kernel(ipynb):
    nb = nbformat.read(ipynb, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{ipynb.name}: need one `parameters` code cell"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("ipynb", IPYNBS, ids=IDS)
def test_thin_notebook_defines_no_function_or_class(ipynb):
    nb = nbformat.read(ipynb, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tree = ast.parse(cell.source, filename=f"{ipynb.name}[{i}]")
        defs = [n.name for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defs, f"{ipynb.name} cell {i} defines {defs}: move them into cartlib"
