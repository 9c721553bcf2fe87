"""Executed notebooks as a byte-stable run record: `normalise_notebook` strips what differs run to run.

`cart-stage` normalises every executed notebook before renaming it into place, so rerunning an
unchanged stage rewrites the same bytes. What goes, and why:

- papermill's timestamps and durations (`metadata.papermill.start_time/end_time/duration`, the same
  keys per cell) and nbclient's per-cell `metadata.execution` timestamps;
- the temp file's name papermill records as `output_path` (replaced by the final path, when given);
  `cart-stage` also records both paths relative to the repository root;
- progress bars: a stream output is rendered as a terminal shows it (each `\\r` overwrites its
  line, consecutive chunks of one stream merged), then every progress-bar line is dropped, as is
  tqdm's "IProgress not found" warning (it quotes this machine's install path). Bars describe the
  run, not its result: besides their times and rates, a run that resumes a finished checkpoint or
  reuses a cached model draws other bars than the run that trained it, for the same result;
- object addresses in reprs (`<… at 0x7f3a…>` → `<… at 0x…>`);
- the random id papermill gives the cell it injects (it becomes `injected-parameters`);
- `execution_count`s are renumbered 1, 2, … over the code cells that ran.

What the notebook *shows* must be stable too: a notebook that prints a wall-clock time still
differs between runs (show `metrics`, not `timings`).
"""
from __future__ import annotations

import copy
import re
from typing import Any

_TIME_KEYS = ("start_time", "end_time", "duration")
_CLOCK = r"(?:\d+:)*\d{2}"
# tqdm's bracket: elapsed[<remaining][, rate][, postfix]
_TQDM_BRACKET = re.compile(rf" ?\[{_CLOCK}(?:<(?:\?|{_CLOCK}))?(?:,\s*[^,\]]*)?(?P<post>(?:,[^\]]*)?)\]")
_BAR = re.compile(r"\d+%\|")  # tqdm's "NN%|██  |"
_UP = "\x1b[A"
_TERMINAL = re.compile(r"(\r|\n|\x1b\[A)")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def normalise_notebook(nb: dict, *, input_path: str | None = None, output_path: str | None = None) -> dict:
    """A copy of an executed notebook (nbformat 4 dict) without run-dependent bytes (see module doc).

    `input_path`/`output_path`, when given, replace the paths papermill recorded (the output's is a temp file).
    """
    nb = copy.deepcopy(nb)
    pm = nb.get("metadata", {}).get("papermill")
    if isinstance(pm, dict):
        for key in _TIME_KEYS:
            pm.pop(key, None)
        for key, value in (("input_path", input_path), ("output_path", output_path)):
            if value is not None:
                pm[key] = value
    count = 0
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {})
        meta.pop("execution", None)
        if "injected-parameters" in meta.get("tags", ()):
            cell["id"] = "injected-parameters"  # papermill draws a random id for the cell it adds
        if isinstance(meta.get("papermill"), dict):
            for key in _TIME_KEYS:
                meta["papermill"].pop(key, None)
        if cell.get("cell_type") != "code":
            continue
        ran = cell.get("execution_count") is not None
        count += ran
        cell["execution_count"] = count if ran else None
        cell["outputs"] = _normalise_outputs(cell.get("outputs", []), count if ran else None)
    return nb


def strip_progress(text: str) -> str:
    """A stream's text as a terminal ends up showing it, without tqdm's times and rates.

    A tiny terminal: `\n` moves down a line, `\r` makes the next write replace its line (tqdm
    rewrites whole, padded lines), `ESC[A` moves up (tqdm's nested bars); trailing blanks are dropped.
    """
    lines, row, replace = [""], 0, False
    for token in _TERMINAL.split(text):
        if token == "\n":
            row, replace = row + 1, False
            if row == len(lines):
                lines.append("")
        elif token == "\r":
            replace = True
        elif token == _UP:
            row = max(row - 1, 0)
        elif token:
            lines[row] = token if replace else lines[row] + token
            replace = False
    kept, skip_next = [], False
    for line in lines:
        if skip_next and line.lstrip().startswith("from .autonotebook"):
            skip_next = False
            continue
        skip_next = "TqdmWarning" in line
        if skip_next or _TQDM_BRACKET.search(line) or _BAR.search(line):
            continue
        kept.append(line.rstrip())
    return "\n".join(kept)


def _normalise_outputs(outputs: list[dict], count: int | None) -> list[dict]:
    out: list[dict] = []
    for o in outputs:
        o = dict(o)
        if o.get("output_type") == "stream":
            if out and out[-1].get("output_type") == "stream" and out[-1].get("name") == o.get("name"):
                out[-1]["text"] = _text(out[-1]) + _text(o)
                continue
            o["text"] = _text(o)
        elif o.get("output_type") == "execute_result":
            o["execution_count"] = count
        if "data" in o:
            o["data"] = {k: _sub_address(v) if k == "text/plain" else v for k, v in o["data"].items()}
        out.append(o)
    for o in out:
        if o.get("output_type") == "stream":
            o["text"] = _sub_address(strip_progress(o["text"]))
    return [o for o in out if o.get("output_type") != "stream" or o["text"].strip()]


def _text(o: dict) -> str:
    t = o.get("text", "")
    return "".join(t) if isinstance(t, list) else t


def _sub_address(v: Any) -> Any:
    if isinstance(v, list):
        return [_ADDRESS.sub(" at 0x…", s) for s in v]
    return _ADDRESS.sub(" at 0x…", v) if isinstance(v, str) else v
