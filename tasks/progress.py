"""How stage logic reports progress: plain events through a callback; display lives at the CLI/flow edge.

A stage function takes ``progress: Reporter | None`` and calls it with :class:`Step` events (``None`` means
nobody listens: :func:`report` makes that a no-op). The CLI turns events into rich progress bars with a rate and
an ETA (``flows/console.py``); a Prefect task turns them into log lines and a progress artifact. Stage modules
never build a console or a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Step:
    """One progress event of a long step.

    ``task`` names the step ("index", "features", "train_top linear", "finetune", "evaluate", "predict");
    ``done`` of ``total`` units (``total`` None while unknown); ``unit`` is what is counted ("img", "epoch");
    ``info`` holds a few figures worth showing (e.g. ``{"val_loss": 0.12}``); ``final`` marks the step's last
    event (the display closes its bar).
    """

    task: str
    done: int
    total: int | None
    unit: str = "img"
    info: Mapping[str, float | int | str] = field(default_factory=dict)
    final: bool = False


Reporter = Callable[[Step], None]


def report(progress: Reporter | None, step: Step) -> None:
    """Send ``step`` to ``progress`` when somebody listens."""
    if progress is not None:
        progress(step)


def counter(
    progress: Reporter | None, task: str, total: int | None, unit: str = "img"
) -> Callable[[int], None]:
    """A ``(done) -> None`` callback for loops that count units: each call reports ``done`` of ``total``; the call
    that reaches ``total`` is the final one."""

    def advance(done: int) -> None:
        report(progress, Step(task, done, total, unit, final=total is not None and done >= total))

    return advance


def keras_epochs(progress: Reporter | None, task: str, epochs: int, first_epoch: int = 0) -> Any:
    """A Keras callback that reports one :class:`Step` per finished epoch (unit "epoch", the epoch's logs rounded
    in ``info``): what ``model.fit(..., verbose=0)`` gives the display instead of Keras' own bar."""
    import keras

    class _EpochSteps(keras.callbacks.Callback):
        done = first_epoch

        def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
            # the display times the task from its first event: send one before the first epoch runs
            report(progress, Step(task, self.done, epochs, "epoch"))

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            info = {k: round(float(v), 4) for k, v in (logs or {}).items() if _is_number(v)}
            self.done = epoch + 1
            report(progress, Step(task, self.done, epochs, "epoch", info, final=self.done >= epochs))

        def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
            if self.done < epochs:  # early stopping ended before `epochs`: close the display's bar
                report(progress, Step(task, self.done, epochs, "epoch", final=True))

    return _EpochSteps()


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
