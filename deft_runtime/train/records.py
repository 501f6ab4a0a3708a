"""What a run reports: one :class:`StepRecord` per step, the JSON-lines :class:`TrainLog`, the progress
bar, and the :class:`TrainResult` of a finished run."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from deft_runtime.adapter import Adapter


@dataclass(frozen=True)
class StepRecord:
    """One line of the JSON-lines log. ``step`` counts finished steps; ``lr`` is what this step used."""

    step: int
    loss: float
    instance_loss: float
    prior_loss: float | None
    lr: dict[str, float]
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class TrainLog:
    """The run's JSON-lines log, appended as steps finish (read it live with ``tail -f``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: StepRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(record.to_json() + "\n")

    def truncate(self, last_step: int) -> None:
        """Drop lines past ``last_step`` (steps a crashed run did after its last checkpoint)."""
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


@dataclass(frozen=True)
class TrainResult:
    out: Path
    adapter: Adapter
    history: list[StepRecord]
    files: list[Path]
    seconds: float

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.history]


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, completed: int) -> Iterator[Callable[[StepRecord], None]]:
    """A rich progress bar showing loss and learning rates (a no-op callback when disabled)."""
    if not enabled:
        yield lambda record: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("train", total=total, completed=completed, status="")

        def advance(record: StepRecord) -> None:
            rates = " ".join(f"lr_{k}={v:.2e}" for k, v in record.lr.items())
            bar.update(task, completed=record.step, status=f"loss={record.loss:.4f} {rates}")

        yield advance
