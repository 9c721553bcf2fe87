"""The smoke-scale copy of the repository that the pipeline tests run (`make reproduce`, as a newcomer
types it, from a shell whose PATH has no virtualenv on it). `VENV=<path>` (Makefile variable) points
make at the virtualenv these tests run in, and `-o <venv>/.installed` tells make to take it as
installed, so nothing is reinstalled. The session fixture `smoke_repo` is in conftest.py."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from test_environment import system_path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VENV = Path(sys.prefix)


def _env():
    env = dict(os.environ, PATH=system_path(), HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    for key in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "MAKEFLAGS", "MAKELEVEL", "MFLAGS"):
        env.pop(key, None)
    return env


def _run(cmd, cwd, check=True):
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, check=check, timeout=1800)


def make_reproduce(repo: Path, *dvc_args: str) -> subprocess.CompletedProcess:
    """The README's command, typed in `repo`, with the test's virtualenv (see module docstring)."""
    args = [f"DVC_ARGS={' '.join(dvc_args)}"] if dvc_args else []
    # `-o <stamp>`: make treats the venv as installed; it must never `pip install -e` the temporary copy
    # into the venv the tests run in (the editable install would then point at the copy)
    return _run(["make", "-o", str(VENV / ".installed"), "reproduce", f"VENV={VENV}", *args], repo, check=False)


def copy_repo(dest: Path, *, scale: str = "smoke") -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("results/", "dvc.lock")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if (ROOT / "results" / "throughput" / "throughput_gpu.csv").exists():  # an input of the throughput stage
        (dest / "results" / "throughput").mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "results" / "throughput" / "throughput_gpu.csv", dest / "results" / "throughput")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["base"]["scale"] = scale
    # every stage runs, not every row: four grid rows (a training, a cache hit, new ids)
    params["ablations"]["rows"] = {k: params["ablations"]["rows"][k] for k in ("full", "no_fusion", "k_16", "beam_5")}
    # and one row trains with 2 data-parallel processes: the stage → notebook → workers path
    params["ablations"]["rows"]["no_fusion"] = {"train": {"fusion": False, "nproc": 2}}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], dest)
    _run(["git", "add", "-A"], dest)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "smoke"], dest)
    return dest


def tree_digest(repo: Path) -> dict[str, str]:
    """sha256 of every file the pipeline wrote under results/ (relative path → digest)."""
    return {p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((repo / "results").rglob("*")) if p.is_file()}
