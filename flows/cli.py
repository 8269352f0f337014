"""``retrainflow`` console script: imports every command module so each registers on the app."""

from flows import (  # noqa: F401  (imported for their command registrations)
    cli_augment,
    cli_doctor,
    cli_features,
    cli_index,
    cli_model,
    cli_orchestrate,
)
from flows.cli_common import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
