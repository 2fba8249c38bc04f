"""Rank-0 run logs: a CSV of every logged step/eval and TensorBoard scalars."""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["MetricsLogger"]


class MetricsLogger:
    """Appends rows to <run_dir>/metrics.csv (resume-safe) and mirrors them to TensorBoard."""

    FIELDS = ["step", "kind", "name", "value"]

    def __init__(self, run_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.csv"
        new = not self.path.exists()
        self._file = self.path.open("a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(self.FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an install requirement; keep the CSV if it is absent
            SummaryWriter = None
        if SummaryWriter is not None:
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._csv.writerow([step, kind, name, f"{value:.8g}"])
            if self.writer is not None:
                self.writer.add_scalar(f"{kind}/{name}", value, step)
        self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.writer is not None:
                self.writer.close()
