"""dvc.yaml's code dependencies and params follow the imports (cartlib.codegraph, cartlib.dvc_deps)."""
from pathlib import Path

import yaml

from cartlib import codegraph
from cartlib.dvc_deps import params_read, regenerate

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_lists_exactly_what_each_stage_imports_and_reads():
    current = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    wanted = regenerate(current, ROOT)
    stale = {name: (current["stages"][name], wanted["stages"][name]) for name in current["stages"]
             if current["stages"][name] != wanted["stages"][name]}
    assert not stale, f"dvc.yaml is out of date for {sorted(stale)}: run `.venv/bin/python -m cartlib.dvc_deps`"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "cartlib"
    for rel, src in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(src)
    return pkg


def test_import_closure_follows_absolute_relative_and_lazy_imports(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from cartlib.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from . import c\ndef f():\n    import cartlib.lazy\n",
        "sub/c.py": "import numpy\nfrom ..d import x\n",
        "d.py": "x = 1\n",
        "lazy.py": "",
        "unused.py": "import cartlib.a\n",
    })
    # hand count: a → sub.b (and its package) → sub.c, lazy → d; unused is never reached
    assert codegraph.import_closure(["cartlib.a"], package_dir=pkg) == [
        "cartlib", "cartlib.a", "cartlib.d", "cartlib.lazy", "cartlib.sub", "cartlib.sub.b", "cartlib.sub.c"]


def test_code_fingerprint_changes_with_any_imported_source(tmp_path):
    pkg = _package(tmp_path, {"__init__.py": "", "a.py": "from cartlib import b\n", "b.py": "y = 1\n",
                              "c.py": "z = 1\n"})
    before = codegraph.code_fingerprint(["cartlib.a"], package_dir=pkg)
    (pkg / "c.py").write_text("z = 2\n")  # not imported by a
    assert codegraph.code_fingerprint(["cartlib.a"], package_dir=pkg) == before
    (pkg / "b.py").write_text("y = 2\n")
    assert codegraph.code_fingerprint(["cartlib.a"], package_dir=pkg) != before


def test_params_read_at_the_finest_level_written_with_matching_smoke_keys():
    src = ["cfg = params.train\nk = params.identifiers.scheme\nseed = p.base.seed\n"]
    smoke = {"train": {"epochs": 1}, "identifiers": {"n_clusters": 8, "scheme": "atomic"}, "data": {"n_train": 5}}
    assert params_read(src, smoke) == ["base.scale", "base.seed", "identifiers.scheme", "smoke.identifiers.scheme",
                                       "smoke.train", "train"]
