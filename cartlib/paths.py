"""Where each stage reads and writes, for one task (the file names are contracts; see DESIGN.md)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class TaskPaths(NamedTuple):
    root: Path
    task: str

    @property
    def data(self) -> Path:
        return self.root / "data" / self.task

    @property
    def dataset(self) -> Path:
        return self.data / "dataset"

    @property
    def qrels(self) -> Path:
        """Test queries → every relevant test item."""
        return self.data / "qrels.tsv"

    @property
    def qrels_val(self) -> Path:
        """Validation queries → every relevant val item (the only queries choices are tuned on)."""
        return self.data / "qrels_val.tsv"

    @property
    def features(self) -> Path:
        return self.data / "features"

    @property
    def models(self) -> Path:
        return self.root / "models" / self.task

    def results(self, stage: str) -> Path:
        return self.root / "results" / stage / self.task


def task_paths(root: str | Path, task: str) -> TaskPaths:
    return TaskPaths(Path(root).resolve(), task)
