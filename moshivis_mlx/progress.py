"""Progress displays for the command-line tools: named steps, and counted bars.

`Steps` follows a short sequence of named steps (finding the weights, downloading them,
loading each model): one bar over the steps on a terminal, a plain line per step
elsewhere. `Counter` counts frames, steps, samples or bytes, one bar per task, with the
caller's rate text (speed, a running score) and the time remaining; off a terminal it
stays silent or, if asked, prints a line at every given fraction of the work. Neither
knows what is being counted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Steps:
    """A progress bar over named steps (plain lines when not on a terminal).

    with Steps(console, 3) as steps:
        with steps.step("language model"):
            ...
    """

    def __init__(self, console: Console, total: int):
        self.console = console
        self.progress: Progress | None = None
        if console.is_terminal:
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<28}"),
                                     BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TimeElapsedColumn(), console=console, transient=True)
            self.task = self.progress.add_task("loading", total=total)

    def __enter__(self) -> Steps:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    @contextmanager
    def step(self, description: str, own_output: bool = False) -> Iterator[None]:
        """One step, ticked off with its duration when it ends. `own_output`: the step
        prints its own progress (a download's bars), so the bar is hidden meanwhile."""
        t0 = time.perf_counter()
        if self.progress is not None:
            task = self.progress.tasks[0]
            if task.completed >= (task.total or 0):  # a step nobody counted (a download)
                self.progress.update(self.task, total=task.completed + 1)
            self.progress.update(self.task, description=description)
        else:
            self.console.print(f"{description} ...", highlight=False)
        if own_output and self.progress is not None:
            self.progress.stop()
            try:
                yield
            finally:
                self.progress.start()
        else:
            yield
        if self.progress is not None:
            self.progress.advance(self.task)
            self.progress.console.print(f"[green]\u2713[/] {description} "
                                        f"[bright_black]({time.perf_counter() - t0:.1f} s)[/]")


class Counter:
    """Counted progress bars: one per task, with a rate and the time remaining.

    unit: "frames", "steps", ... (shown after the count), "bytes" (sizes), or "" (a bare
    count). rate: the caller's text for the rate ("3.1x real time"), given to `update`.
    every: when not on a terminal, print a line (with the rate text) each time this
    fraction of a task is done (0.25: at each quarter); None: silent.
    """

    def __init__(self, console: Console | None = None, unit: str = "",
                 transient: bool = True, every: float | None = None,
                 show: bool | None = None):
        """`show`: draw the bars (default: only on a terminal)."""
        self.console = console or Console()
        self.unit = unit
        self.every = every if not self.console.is_terminal else None
        count: ProgressColumn
        if unit == "bytes":
            count = DownloadColumn()
        elif unit:
            count = TextColumn(f"{{task.completed}}/{{task.total}} {unit}")
        else:
            count = MofNCompleteColumn()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), count,
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 console=self.console, transient=transient,
                                 disable=not (self.console.is_terminal if show is None
                                              else show))
        self._next_note: dict[TaskID, float] = {}
        self._named: dict[str, TaskID] = {}

    def __enter__(self) -> Counter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def add(self, description: str, total: int, completed: int = 0) -> TaskID:
        task = self.progress.add_task(description, total=total, completed=completed, rate="")
        self._next_note[task] = self.every or 1.0
        if self.every and total:
            while self._next_note[task] <= completed / total:
                self._next_note[task] += self.every
        return task

    def update(self, task: TaskID, completed: int, rate: str | None = None) -> None:
        fields = {} if rate is None else {"rate": rate}
        self.progress.update(task, completed=completed, **fields)
        if self.every is not None:
            self._note(task, completed)

    def track(self, description: str, completed: int, total: int) -> None:
        """`progress(what, done, total)` callbacks (a conversion's parts): a task per
        description, made on first sight."""
        task = self._named.get(description)
        if task is None:
            task = self._named[description] = self.add(description, total)
        self.update(task, completed)

    def advance(self, task: TaskID, n: int = 1) -> None:
        self.progress.advance(task, n)
        if self.every is not None:
            self._note(task, int(self.progress.tasks[task].completed))

    def _note(self, task: TaskID, done: int) -> None:
        t = self.progress.tasks[task]
        total = t.total or 0
        if total and done / total >= self._next_note[task] - 1e-9:
            unit = f" {self.unit}" if self.unit else ""
            rate = t.fields.get("rate") or ""
            self.console.print(f"  {100 * done // total}% ({done}/{total}{unit})"
                               f"{', ' + rate if rate else ''}", highlight=False)
            while self._next_note[task] <= done / total + 1e-9:
                self._next_note[task] += self.every
