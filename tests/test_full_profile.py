"""The `full` profile: params.full.yaml, applied by `make reproduce-full` as `dvc exp run -S …`
(cartlib/profiles.py, scripts/run_profile.py, docs/full_profile.md).

Fast tests: the overlay merges into params.yaml and validates; its `-S` arguments, applied by DVC
(its own code, and the real `dvc exp run` in a toy repository), give exactly the merged params; a
bad overlay fails naming the overlay file and the key, before anything runs. The slow test runs
`make reproduce-full` on a copy of the smoke pipeline with the profile restricted to two rows and
two tasks."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cartlib import profiles
from cartlib.config import ConfigError, load_params, params_from_dict, with_overrides
from cartlib.stages.variant import row_seeds
from pipeline_repo import BIN, VENV, _run

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "params.full.yaml"
GIT_ID = ["-c", "user.email=t@t", "-c", "user.name=t"]


def canonical(data) -> str:
    return json.dumps(data, sort_keys=True)  # 0 and 0.0 differ


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------- fast
def test_the_full_profile_merges_into_params_yaml_and_validates():
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    profile = profiles.load(FULL, root=ROOT)
    overlay = yaml.safe_load(FULL.read_text())
    p = profile.params
    assert p.grid.train == {} and p.ablations.tasks == ("image", "audio", "video")
    assert p.throughput.batch_sizes == (1, 100, 1024)
    assert p.base.scale == load_params(ROOT / "params.yaml").base.scale  # the profile keeps the scale
    # the grid at the main model's scale: a grid row's train config is the `train` section itself
    assert with_overrides(p, {"train": p.grid.train}).train == p.train
    # only the overlaid keys change; everything else is params.yaml's
    expected = copy.deepcopy(base)
    expected["grid"]["train"] = {}
    expected["ablations"]["tasks"] = ["image", "audio", "video"]
    expected["throughput"]["batch_sizes"] = [1, 100, 1024]
    expected["smoke"]["grid"]["train"] = {}
    assert canonical(profile.merged) == canonical(expected)
    assert {".".join(k) for k, _ in profile.changes} == {
        "grid.train", "ablations.tasks", "throughput.batch_sizes", "smoke.grid.train"}
    assert set(overlay) <= {"grid", "ablations", "throughput", "smoke"}
    # at smoke scale (the tests) the same profile: the grid trains at smoke.train's scale
    smoke = params_from_dict({**profile.merged, "base": {**profile.merged["base"], "scale": "smoke"}})
    assert with_overrides(smoke, {"train": smoke.grid.train}).train == smoke.train


def test_the_set_args_round_trip_through_dvc(tmp_path):
    """Lists, mappings replaced whole (grid.train={} would merge: nothing changes), quoted strings,
    floats, booleans, keys params.yaml lacks: DVC's override code writes exactly the merged params."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["smoke"].pop("grid", None)  # a section params.yaml lacks: added with its parents
    params_file = write_yaml(tmp_path / "params.yaml", base)
    overlay = yaml.safe_load(FULL.read_text())
    overlay["ablations"]["rows"] = {"full": {}, "no_consistency": {"train": {"consistency_weight": 0.0}},
                                    "beam_5": {"evaluate": {"beam": 5, "top_k": 5}}}
    overlay["base"] = {"device": "cuda:0"}
    overlay["data"] = {"root": "/data/my set", "captioner_error_rate": 0.25}
    overlay["train"] = {"fusion": False, "lr": 2.0e-4, "precision": "bf16"}
    overlay["tsne"] = {"task": "audio"}
    profile = profiles.load(write_yaml(tmp_path / "overlay.yaml", overlay), root=tmp_path)
    assert "~grid.train" in profile.sets and "+grid.train={}" in profile.sets
    assert "+smoke.grid.train={}" in profile.sets  # parents created by Hydra
    written = profiles.apply_sets(params_file, profile.sets)
    assert canonical(written) == canonical(profile.merged)
    assert written["ablations"]["rows"] == overlay["ablations"]["rows"]  # the other rows are gone
    assert written["base"]["device"] == "cuda:0" and written["train"]["lr"] == 2.0e-4
    # what a plain `-S grid.train={}` would do (the reason for ~/+): Hydra merges, nothing changes
    merged_in = profiles.apply_sets(params_file, ["grid.train={}"])
    assert merged_in["grid"]["train"] == base["grid"]["train"] != {}


def test_dvc_exp_run_applies_the_full_profile(tmp_path):
    """The real command line (`-S` splitting, shell-free arguments) in a toy repository: params.yaml
    afterwards is exactly the merged params, comments of the untouched keys kept."""
    repo = tmp_path / "toy"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo ok > out.txt\n"
                                   "    params: [grid, ablations, throughput, smoke]\n    outs: [out.txt]\n")
    _run(["git", "init", "-q"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", *GIT_ID, "commit", "-qm", "toy"], repo)
    profile = profiles.load(FULL, root=repo)
    proc = _run([str(BIN / "dvc"), *profile.command()], repo, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = (repo / "params.yaml").read_text()
    assert canonical(yaml.safe_load(text)) == canonical(profile.merged)
    assert "# the single source of hyperparameters" in text.lower()
    assert _run([str(BIN / "dvc"), "exp", "list", "--name-only"], repo).stdout.strip()  # listed as an experiment


def test_apply_writes_the_profile_into_params_yaml(tmp_path):
    """`apply` (for the queue: the profile committed, then `make queue-grid`): params.yaml becomes the
    merged params, its comments kept; nothing runs."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.run([str(BIN / "python"), str(ROOT / "scripts" / "run_profile.py"), "apply", str(FULL)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "params.yaml").read_text()
    assert canonical(yaml.safe_load(text)) == canonical(profiles.load(FULL, root=ROOT).merged)
    assert "# the single source of hyperparameters" in text.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("overlay, key", [
    ({"train": {"d_modle": 128}}, "train.d_modle"),
    ({"trian": {"d_model": 128}}, "trian"),
    ({"smoke": {"grid": {"trian": {}}}}, "smoke.grid.trian"),
    ({"ablations": {"tasks": ["image", "speech"]}}, "ablations.tasks"),
    ({"train": {"epochs": "many"}}, "train.epochs"),
    ({"ablations": {"rows": {"full": {}, "x": {"train": {"fusoin": False}}}}}, "ablations.rows.x.train"),
])
def test_a_bad_overlay_fails_naming_the_file_and_the_key(tmp_path, overlay, key):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    path = write_yaml(tmp_path / "params.mine.yaml", overlay)
    with pytest.raises(ConfigError) as err:
        profiles.load(path, root=tmp_path)
    assert "params.mine.yaml" in str(err.value) and key in str(err.value)


def test_run_with_a_bad_overlay_runs_nothing(tmp_path):
    """`run` exits 2 with the error on stderr; params.yaml is untouched (dvc never started)."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    write_yaml(tmp_path / "params.bad.yaml", {"grid": {"trian": {}}})
    proc = subprocess.run([str(BIN / "python"), str(ROOT / "scripts" / "run_profile.py"), "run", "params.bad.yaml"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "params.bad.yaml" in proc.stderr and "grid.trian" in proc.stderr
    assert "dvc exp run" not in proc.stdout
    assert (tmp_path / "params.yaml").read_text() == before


def test_make_reproduce_full_runs_the_profile_with_the_venv_first_on_path():
    out = _run(["make", "-n", "-o", str(VENV / ".installed"), "reproduce-full", f"VENV={VENV}",
                "PROFILE=params.mine.yaml", "DVC_ARGS=--temp"], ROOT).stdout
    assert f'PATH="{BIN}:' in out
    assert f"{BIN}/python scripts/run_profile.py run params.mine.yaml --temp" in out
    assert "scripts/run_profile.py run params.full.yaml" in _run(
        ["make", "-n", "-o", str(VENV / ".installed"), "reproduce-full", f"VENV={VENV}"], ROOT).stdout


# ------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_make_reproduce_full_runs_the_grid_on_more_tasks(smoke_repo, tmp_path):
    """`make reproduce-full` on a copy of the smoke run, with params.full.yaml restricted to two rows
    (a seeded one that trains, one that reuses its model) on two tasks: the rows run on audio, the
    workspace holds the profile's params and results, and `dvc status` is clean."""
    repo = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(smoke_repo), str(repo)], check=True)
    shutil.rmtree(repo / ".dvc" / "tmp", ignore_errors=True)
    _run(["git", "add", "-A"], repo)  # the smoke run committed, as a user's results are
    _run(["git", *GIT_ID, "commit", "-qm", "smoke run"], repo)
    smoke_rows = yaml.safe_load((repo / "params.yaml").read_text())["ablations"]["rows"]
    overlay = yaml.safe_load(FULL.read_text())
    overlay["ablations"]["tasks"] = ["image", "audio"]
    overlay["ablations"]["rows"] = {r: smoke_rows[r] for r in ("full", "beam_5")}
    # kept short (~2 min on 2 cores): no throughput rerun (batch 1,024 differs off smoke scale only) and
    # the grid on smoke.grid.train's tiny schedule (smoke.grid.train: {} trains every row at smoke.train's
    # scale: ~1 min per training here); both keys are checked by the fast tests
    overlay.pop("throughput")
    overlay.pop("smoke")
    write_yaml(repo / "params.test.yaml", overlay)
    expected = profiles.load("params.test.yaml", root=repo).merged

    proc = _run(["make", "-o", str(VENV / ".installed"), "reproduce-full", f"VENV={VENV}",
                 "PROFILE=params.test.yaml"], repo, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    assert canonical(yaml.safe_load((repo / "params.yaml").read_text())) == canonical(expected)
    params = load_params(repo / "params.yaml")
    assert params.smoke and params.base.scale.value == "smoke"  # the smoke copy's scale stays on
    assert yaml.safe_load((repo / "params.yaml").read_text())["grid"]["train"] == {}  # the profile's grid
    for task in ("image", "audio"):
        for row in ("full", "beam_5"):
            m = json.loads((repo / "results" / "ablations" / task / row / "metrics.json").read_text())
            assert m["n_seeds"] == len(row_seeds(params, row)), (task, row)
    assert len(row_seeds(params, "full")) == 2  # smoke.ablations.seeds: the seeded row trained twice
    assert not (repo / "results" / "ablations" / "video").exists()
    status = _run([str(BIN / "dvc"), "status"], repo)
    assert "up to date" in status.stdout, status.stdout
    assert _run([str(BIN / "dvc"), "exp", "list", "--name-only"], repo).stdout.strip()  # `dvc exp show` lists it


def test_profile_dataclass_command_shape():
    p = profiles.Profile(overlay=FULL, changes=[], merged={}, params=load_params(ROOT / "params.yaml"),
                         sets=["a=1", "~b", "+b={}"])
    assert p.command("--temp") == ["exp", "run", "-S", "a=1", "-S", "~b", "-S", "+b={}", "--temp"]
