"""flows/console.py: progress steps as plain lines (logs, CI) with a rate and an ETA; tee."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from flows import console as display
from tasks.progress import Step


def test_plain_lines_give_rate_eta_and_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.0, 10.0, 20.0])  # the task starts at 0 s (its first event); epochs end at 10 s, 20 s
    monkeypatch.setattr(display.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    with display.progress_display(Console(file=out, force_terminal=False, width=200)) as report:
        report(Step("finetune", 0, 2, "epoch"))
        report(Step("finetune", 1, 2, "epoch", {"val_loss": 0.25}))
        report(Step("finetune", 2, 2, "epoch", {"val_loss": 0.2}, final=True))
    lines = out.getvalue().splitlines()
    assert lines[1] == "finetune 1/2 epoch  10.0 s/epoch  ETA 0:10  val_loss 0.2500"
    assert lines[2] == "finetune 2/2 epoch  10.0 s/epoch  done in 20.0 s  val_loss 0.2000"


def test_counted_tasks_print_every_tenth_and_the_end() -> None:
    out = io.StringIO()
    with display.progress_display(Console(file=out, force_terminal=False, width=200)) as report:
        for done in range(0, 101):
            report(Step("features", done, 100, final=done == 100))
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 12 and lines[-1].startswith("features 100/100 img") and "done in" in lines[-1]


def test_disabled_display_prints_nothing_and_tee_sends_to_all() -> None:
    out = io.StringIO()
    with display.progress_display(Console(file=out), enabled=False) as report:
        report(Step("index", 1, 1, final=True))
    assert out.getvalue() == ""
    seen: list[Step] = []
    both = display.tee(seen.append, None, seen.append)
    both(Step("index", 1, 2))
    assert len(seen) == 2 and display.tee(None) is None
