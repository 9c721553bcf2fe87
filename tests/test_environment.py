"""The install and the commands of `make reproduce` work on a clean machine (no activated venv)."""
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_lock_pins_every_direct_dependency_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"requirements.lock has no pin for {req.name} (pyproject.toml: {spec}); run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {spec}"
    assert pins["torch"] == "2.13.0"  # an unpinned torch pulls a multi-GB CUDA build


def test_environment_yml_carries_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    locked = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")]
    assert [p for p in pip if p != "-e ."] == locked


def system_path() -> str:
    """PATH without any virtualenv's bin: what a newcomer's shell has."""
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not (Path(p).parent / "pyvenv.cfg").exists())


def test_every_dvc_command_runs_under_make_reproduce():
    """`make reproduce` runs each stage's `cmd`; its program must be found on the PATH make gives it."""
    make = shutil.which("make")
    assert make, "make is needed (README: the two commands are make targets)"
    env = dict(os.environ, PATH=system_path())
    path = subprocess.run([make, "-s", "stage-path", f"VENV={sys.prefix}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        cmd = (stage.get("do") or stage)["cmd"]
        program = shlex.split(cmd)[0]
        assert shutil.which(program, path=path), f"stage {name}: {program!r} is not on make reproduce's PATH {path}"
