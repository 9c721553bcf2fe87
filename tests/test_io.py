"""Byte-stable files: figures saved twice are identical; executed notebooks lose run-dependent bytes."""
from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from cartlib import io
from cartlib.notebook_io import normalise_notebook, strip_progress


def test_saving_the_same_figure_twice_gives_identical_bytes(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [2, 1, 3], label="a")
    ax.legend()
    first = io.save_figure(fig, tmp_path / "a")
    time.sleep(1.1)  # a PDF creation date has one-second resolution
    second = io.save_figure(fig, tmp_path / "b")
    plt.close(fig)
    assert [p.suffix for p in first] == [".png", ".pdf"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.suffix


def _executed(start: str, rate: str, ids: tuple[str, ...] = ("x1", "x2")) -> dict:
    """A notebook as papermill leaves it, with the run-dependent parts parameterised."""
    timing = {"start_time": start, "end_time": start, "duration": 0.5, "exception": False, "status": "completed"}
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"papermill": {"start_time": start, "end_time": start, "duration": 2.0, "version": "2.7.0",
                                   "input_path": "/abs/notebooks/07_tsne.ipynb",
                                   "output_path": f"/abs/results/.07_tsne.ipynb.{ids[0]}.tmp.ipynb",
                                   "parameters": {"task": "image"}}},
        "cells": [
            {"cell_type": "markdown", "id": "m", "metadata": {}, "source": "# title"},
            {"cell_type": "code", "id": ids[1], "execution_count": 7, "source": "task = 'image'",
             "metadata": {"tags": ["injected-parameters"], "papermill": dict(timing),
                          "execution": {"iopub.execute_input": start}}, "outputs": []},
            {"cell_type": "code", "id": "c", "execution_count": 9, "source": "train()",
             "metadata": {"papermill": dict(timing), "execution": {"shell.execute_reply": start}},
             "outputs": [
                 {"output_type": "stream", "name": "stderr", "text": "\rtrain:   0%|          | 0/5 [00:00<?, ?it/s]"},
                 {"output_type": "stream", "name": "stderr",
                  "text": f"\rtrain: 100%|██████████| 5/5 [00:01<00:00,  {rate}it/s, loss=0.5]\n"},
                 {"output_type": "stream", "name": "stdout", "text": "done\n"},
                 {"output_type": "execute_result", "execution_count": 9, "metadata": {},
                  "data": {"text/plain": [f"<Model at 0x7f{ids[0]}ab>"]}},
             ]},
        ],
    }


def test_normalise_notebook_drops_timestamps_rates_and_random_ids():
    a = normalise_notebook(_executed("2024-01-01T10:00:00", "3.2", ("aa", "11")), output_path="results/x.ipynb")
    b = normalise_notebook(_executed("2025-06-30T23:59:59", "41.7", ("bb", "22")), output_path="results/x.ipynb")
    assert a == b
    pm = a["metadata"]["papermill"]
    assert not {"start_time", "end_time", "duration"} & set(pm) and pm["output_path"] == "results/x.ipynb"
    code = [c for c in a["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == [1, 2]
    assert all("execution" not in c["metadata"] and "start_time" not in c["metadata"]["papermill"] for c in code)
    assert code[1]["metadata"]["papermill"]["status"] == "completed"
    streams = [o for o in code[1]["outputs"] if o["output_type"] == "stream"]
    assert [o["text"] for o in streams] == ["done\n"]  # progress bars describe the run, not its result
    assert code[1]["outputs"][-1]["execution_count"] == 2


def test_normalise_notebook_leaves_the_input_untouched():
    nb = _executed("2024-01-01T10:00:00", "3.2")
    normalise_notebook(nb)
    assert nb["metadata"]["papermill"]["start_time"] == "2024-01-01T10:00:00"


@pytest.mark.parametrize("raw, shown", [
    ("\rx:  50%|█    | 1/2 [00:01<00:01,  1.01s/it]\rx: 100%|██| 2/2 [00:02<00:00,  1.00s/it]\n", ""),
    ("12it [01:02:03, 12.3kit/s]\n", ""),
    ("outer: 0%| | 0/1 [00:00<?, ?it/s]\n\rinner: 1/2 [00:00<00:00, 9.9it/s]\x1b[A\n\rinner: 2/2 [00:00<00:00, 9.9it/s]\x1b[A",
     ""),
    ("before\rtrain CART: 100%|██████████| 2/2 [00:03<00:00, loss=1.2, val_r1=0.1]\nafter\n", "after\n"),
    ("/x/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found.\n  from .autonotebook import tqdm\nok\n",
     "ok\n"),
    ("plain text [not a bar]\n", "plain text [not a bar]\n"),
])
def test_strip_progress_drops_progress_bars_and_the_tqdm_warning(raw, shown):
    assert strip_progress(raw) == shown


def test_gzip_tsv_is_byte_stable_whatever_its_name_and_reads_back(tmp_path):
    import pandas as pd

    from cartlib.io import write_dataframe_tsv

    frame = pd.DataFrame({"query_id": ["q1", "q2"], "rank": [1, 1], "item_id": ["a", "b"], "score": [0.5, 0.25]})
    a = write_dataframe_tsv(tmp_path / "a.tsv.gz", frame)
    b = write_dataframe_tsv(tmp_path / "sub" / "b.tsv.gz", frame)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes()[:2] == b"\x1f\x8b"
    pd.testing.assert_frame_equal(pd.read_csv(a, sep="\t"), frame)
