"""The errors a user meets: one place for every domain error class (the CLI's error map names these).

Each says what is wrong with the user's input or environment, in one line, with what to do. Anything else that
escapes a stage is a bug and shows its traceback. ``ParamsError`` (bad params) lives with the params schema in
``tasks/config.py``.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Input that a stage cannot work with (a split with no images, a model file of the wrong kind, a layer
    pattern that matches nothing...): the message names the input and the value received."""


class DatasetError(InputError):
    """The dataset as a whole cannot be indexed (no images, one class, an empty class, bad CSV columns...)."""


class ImageRejected(InputError):
    """A file that must not reach training: ``reason`` is one human-readable line, ``kind`` a short category
    (``empty``, ``not_image``, ``unsupported``, ``too_large``, ``undecodable``) for summaries."""

    def __init__(self, reason: str, kind: str = "invalid"):
        self.reason = reason
        self.kind = kind
        super().__init__(reason)


class FeaturesMismatchError(InputError):
    """The cached features are not the ones the params ask for (other params, or another index): the message
    names what differs and says to run the features stage."""


class CutPointError(InputError):
    """The first unfrozen block of a base does not read exactly one tensor of the frozen part, so there is no single
    activation to cache for tail fine-tuning: the message names the base and the block."""


class RegistryError(InputError):
    """The registry file or the candidate's metrics are missing or malformed."""


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights are neither in the Keras cache nor downloadable (offline)."""


class LockHeldError(RuntimeError):
    """Another process holds the workspace lock; the message names its PID and command."""

    def __init__(self, path: Path, holder: dict[str, object]):
        self.path = path
        self.holder = holder
        pid = holder.get("pid", "?")
        what = holder.get("command") or "another retrainflow run"
        since = holder.get("since", "?")
        super().__init__(
            f"another retrainflow run holds the workspace lock {path} (pid {pid}, since {since}: {what}); "
            f"wait for it to finish, or stop it (kill {pid}) and start again"
        )
