"""cart-stage: a failed stage leaves nothing that looks current; executed notebooks are byte-stable.

The stage runs below execute tiny hand-made notebooks in a temporary root (a kernel start each).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from cartlib import cli

REPO = Path(__file__).resolve().parents[1]


def _root(tmp_path: Path, *code_cells: str) -> Path:
    """A repository root with params.yaml and notebooks/07_tsne.ipynb made of `code_cells`."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('task = ""\nroot = "."')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in code_cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "notebooks").mkdir(exist_ok=True)
    nbformat.write(nb, tmp_path / "notebooks" / "07_tsne.ipynb")
    return tmp_path


def _stale(folder: Path) -> None:
    """What a previous successful run left."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "timings.json", "tsne_prefixes.png", "tsne_prefixes.pdf", "07_tsne.ipynb"):
        (folder / name).write_text("old")


def test_failed_stage_by_hand_leaves_only_the_failed_notebook_and_a_note(tmp_path):
    root = _root(tmp_path, "open('results/tsne/image/metrics.json', 'w').write('{}')  # a partial write",
                 "raise ValueError('boom in the notebook')")
    folder = root / "results" / "tsne" / "image"
    _stale(folder)
    with pytest.raises(Exception, match="boom"):
        cli.run_stage("tsne", "image", root=root)
    assert sorted(p.name for p in folder.iterdir()) == ["07_tsne.failed.ipynb", "FAILED.md"]
    note = (folder / "FAILED.md").read_text()
    assert "tsne" in note and "image" in note and "boom in the notebook" in note


def test_success_removes_the_failure_note_and_writes_the_same_bytes_twice(tmp_path):
    root = _root(tmp_path,
                 "import sys, time\nfrom tqdm import tqdm\n"
                 "for i in tqdm(range(3), desc='work', mininterval=0, file=sys.stderr):\n    time.sleep(0.05 * (1 + i))",
                 "print('done')")
    folder = root / "results" / "tsne" / "image"
    _stale(folder)
    (folder / "FAILED.md").write_text("old failure")
    (folder / "07_tsne.failed.ipynb").write_text("{}")
    out = cli.run_stage("tsne", "image", root=root)
    assert sorted(p.name for p in folder.iterdir()) == ["07_tsne.ipynb"]  # stale results and failure gone
    first = out.read_bytes()
    nb = json.loads(first)
    assert not {"start_time", "end_time", "duration"} & set(nb["metadata"]["papermill"])
    assert nb["metadata"]["papermill"]["output_path"] == "results/tsne/image/07_tsne.ipynb"
    assert "it/s" not in first.decode() and "work:" not in first.decode()  # no progress bar in the record
    assert "done" in first.decode()
    assert cli.run_stage("tsne", "image", root=root).read_bytes() == first


def test_clearing_keeps_inputs_and_touches_only_the_stage_own_results(tmp_path):
    res = tmp_path / "results"
    for rel in ("throughput/metrics.json", "throughput/throughput.png", "throughput/throughput_gpu.csv",
                "ablations/image/atomic/metrics.json", "ablations/image/full/metrics.json",
                "report/09_report.ipynb", "REPORT.md", "tables/main.md", "evaluate/image/metrics.json"):
        (res / rel).parent.mkdir(parents=True, exist_ok=True)
        (res / rel).write_text("old")
    cli.clear_outputs(cli.stage_outputs("throughput", root=tmp_path))
    assert [p.name for p in (res / "throughput").iterdir()] == ["throughput_gpu.csv"]
    cli.clear_outputs(cli.stage_outputs("ablations", root=tmp_path, where="image", variant="atomic"))
    assert not (res / "ablations/image/atomic/metrics.json").exists()
    assert (res / "ablations/image/full/metrics.json").exists()
    cli.clear_outputs(cli.stage_outputs("report", root=tmp_path))
    assert not any(p.exists() for p in (res / "REPORT.md", res / "tables/main.md", res / "report/09_report.ipynb"))
    assert (res / "evaluate/image/metrics.json").exists()
