"""Progress of long stages: a rich bar on the terminal and a Prefect progress artifact in the UI."""

from __future__ import annotations

import sys
import threading
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class StageProgress:
    """A thread-safe ``progress(n)`` callback; updates the UI artifact at most every ``every_s`` seconds."""

    def __init__(self, stage: str, total: int, every_s: float = 2.0, show_bar: bool | None = None,
                 unit: str = "samples"):
        self.stage, self.total, self.done, self.every_s, self.unit = stage, max(total, 0), 0, every_s, unit
        self.spent_usd: float | None = None  # live LLM spend (add_spend), shown beside the bar and in the artifact
        self._lock = threading.Lock()
        self._last = 0.0
        self._artifact_id = None
        try:
            from prefect.artifacts import create_progress_artifact

            self._artifact_id = create_progress_artifact(
                progress=0.0, key=f"{stage}-progress", description=f"{stage}: {unit} processed"
            )
        except Exception:  # noqa: BLE001 - progress display must never fail a run (e.g. outside a flow)
            self._artifact_id = None
        show = sys.stderr.isatty() if show_bar is None else show_bar
        self._bar = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             TextColumn("{task.fields[spend]}"), transient=True) if show else None
        if self._bar:
            self._bar.start()
            self._task = self._bar.add_task(stage, total=self.total, spend="")

    def __call__(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._bar:
                self._bar.update(self._task, completed=self.done)
            now = time.monotonic()
            if self._artifact_id is not None and (now - self._last >= self.every_s or self.done >= self.total):
                self._last = now
                self._push()

    def add_spend(self, usd: float) -> None:
        """Add the cost of a finished sample's LLM calls to the live spend line."""
        with self._lock:
            self.spent_usd = (self.spent_usd or 0.0) + usd
            if self._bar:
                self._bar.update(self._task, spend=self.spend_line())

    def spend_line(self) -> str:
        return "" if self.spent_usd is None else f"LLM spend ${self.spent_usd:.4f}"

    def _push(self) -> None:
        try:
            from prefect.artifacts import update_progress_artifact

            pct = 100.0 * self.done / self.total if self.total else 100.0
            description = f"{self.stage}: {self.done}/{self.total} {self.unit} processed"
            if self.spent_usd is not None:
                description += f"; {self.spend_line()}"
            update_progress_artifact(self._artifact_id, progress=pct, description=description)
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        if self._artifact_id is not None:
            self._push()
        if self._bar:
            self._bar.stop()

