"""The ``retrainflow`` command line: importing the package registers every command on :data:`app`.

``common`` holds the app, the shared options, the exit codes and the error map; one module per area registers
its commands (``index``, ``augment``, ``features``, ``model``, ``orchestrate``, ``doctor``); ``defaults`` is the
environment the CLI sets before TensorFlow, Prefect or DVC load, ``prefect_api`` which Prefect API a command
reports to. The Prefect side (flows, tasks, artifacts, deployments, the flows' DVC steps) stays in ``flows/``;
``flows.console`` (progress display) is shared by both edges.
"""

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
