"""``retrainflow`` console script: imports every command module so each registers on the app."""

from flows.cli import (  # noqa: F401  (imported for their command registrations)
    augment,
    doctor,
    features,
    index,
    model,
    orchestrate,
)
from flows.cli.common import app

__all__ = ["app"]
