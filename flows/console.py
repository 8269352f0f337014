"""Display at the CLI edge: stage progress events (``tasks.progress.Step``) as rich bars, or as plain lines.

On a terminal each task gets a bar with done/total, a rate and an ETA, and the figures the stage reports
(``val_loss`` ...). Elsewhere (logs, CI, a pipe) a task prints a plain line every ``LINE_EVERY`` of its total,
every epoch, and at its end, so a long step is never silent. Stage logic only calls the yielded reporter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from tasks.progress import Reporter, Step

LINE_EVERY = 0.10  # plain mode: a line per 10 % of a counted task
INFO_SHOWN = 4  # figures shown per event (the first ones the stage reports)


@dataclass
class _Task:
    started: float = field(default_factory=lambda: time.perf_counter())
    bar_id: Any = None
    last_line: float = -1.0


def format_info(info: Any) -> str:
    """``val_loss 0.1234  val_accuracy 0.9600`` from a step's figures (the first few)."""
    items = list(info.items())[:INFO_SHOWN]
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in items)


def rate_text(step: Step, elapsed: float) -> str:
    """``123.4 img/s`` (or ``s/epoch`` for slow units), empty before anything is done."""
    if step.done <= 0 or elapsed <= 0:
        return ""
    per_second = step.done / elapsed
    if per_second >= 1:
        return f"{per_second:.1f} {step.unit}/s"
    return f"{elapsed / step.done:.1f} s/{step.unit}"


def eta_text(step: Step, elapsed: float) -> str:
    """``ETA 1:23`` from the rate so far; empty when the total is unknown or nothing is done."""
    if step.total is None or step.done <= 0 or step.done >= step.total:
        return ""
    left = elapsed / step.done * (step.total - step.done)
    minutes, seconds = divmod(int(round(left)), 60)
    return f"ETA {minutes}:{seconds:02d}"


def plain_line(step: Step, elapsed: float) -> str:
    """One log line for a step: ``features 512/2000 img  123.4 img/s  ETA 0:12  val_loss 0.1``."""
    count = f"{step.done}/{step.total}" if step.total is not None else str(step.done)
    parts = [f"{step.task} {count} {step.unit}", rate_text(step, elapsed), eta_text(step, elapsed)]
    if step.final:
        parts.append(f"done in {elapsed:.1f} s")
    parts.append(format_info(step.info))
    return "  ".join(p for p in parts if p)


class _Display:
    """The reporter behind :func:`progress_display` and :func:`log_display`: one bar (or line stream) per task."""

    def __init__(self, emit: Callable[[str], None], bars: Any = None):
        self.emit = emit  # where plain lines go
        self.bars = bars  # a started rich Progress, or None for plain lines
        self.tasks: dict[str, _Task] = {}

    def __call__(self, step: Step) -> None:
        state = self.tasks.get(step.task)
        if state is None:
            state = self.tasks[step.task] = _Task()
        elapsed = time.perf_counter() - state.started
        if self.bars is None:
            self._line(step, state, elapsed)
        else:
            self._bar(step, state, elapsed)
        if step.final:
            del self.tasks[step.task]

    def _line(self, step: Step, state: _Task, elapsed: float) -> None:
        fraction = step.done / step.total if step.total else 0.0
        due = step.final or step.unit == "epoch" or fraction - state.last_line >= LINE_EVERY
        if due:
            state.last_line = fraction
            self.emit(plain_line(step, elapsed))

    def _bar(self, step: Step, state: _Task, elapsed: float) -> None:
        fields = {
            "rate": rate_text(step, elapsed),
            "eta": eta_text(step, elapsed),
            "info": format_info(step.info),
        }
        if state.bar_id is None:
            state.bar_id = self.bars.add_task(step.task, total=step.total, **fields)
        self.bars.update(state.bar_id, completed=max(step.done, 0), total=step.total, **fields)
        if step.final:
            self.bars.update(state.bar_id, eta=f"{elapsed:.1f} s")
            self.bars.stop_task(state.bar_id)


@contextmanager
def progress_display(console: Console | None = None, *, enabled: bool | None = None) -> Iterator[Reporter]:
    """Yield a :data:`~tasks.progress.Reporter` that draws the steps it is sent.

    ``enabled`` None: bars on a terminal, plain lines elsewhere; False: nothing at all (``--quiet`` style).
    """
    console = console if console is not None else Console(stderr=True)
    if enabled is False:
        yield lambda step: None
        return
    if not console.is_terminal:
        yield _Display(lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[eta]}"),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        yield _Display(console.print, bars)


def log_display(log: Callable[[str], None]) -> Reporter:
    """A reporter that writes plain progress lines (rate, ETA, figures) through ``log``, e.g. a Prefect run
    logger's ``info``: inside flows the lines reach the terminal and the dashboard's logs alike."""
    return _Display(log)


def tee(*reporters: Reporter | None) -> Reporter | None:
    """One reporter that sends each step to every given one (None when none is given)."""
    listening = [r for r in reporters if r is not None]
    if not listening:
        return None
    if len(listening) == 1:
        return listening[0]

    def send(step: Step) -> None:
        for reporter in listening:
            reporter(step)

    return send
