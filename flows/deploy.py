"""Scheduled retraining: serve the ``retrain`` flow as a deployment on a cron schedule.

``retrainflow serve --cron "0 3 * * *"`` runs :func:`serve_retrain` (a long-lived process that registers the
deployment and runs each scheduled flow run). ``prefect.yaml`` describes the same deployment for
``prefect deploy`` to a work pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_DEPLOYMENT = "scheduled-retrain"


def validate_cron(cron: str) -> str:
    """Check a five-field cron expression with Prefect's own ``CronSchedule``; return it stripped."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    text = cron.strip() if isinstance(cron, str) else cron
    if not isinstance(text, str) or len(text.split()) != 5:
        raise ValueError(f"expected a five-field cron expression like '0 3 * * *', got {cron!r}")
    try:
        CronSchedule(cron=text)
    except ValidationError:
        raise ValueError(f"expected a valid cron expression like '0 3 * * *', got {cron!r}") from None
    return text


def deployment_parameters(
    params_file: Path, overrides: list[str] | None, workdir: Path, force: bool = False
) -> dict[str, Any]:
    """The retrain flow's parameters for every scheduled run (absolute paths: the runner may start elsewhere)."""
    return {
        "params_file": str(params_file.resolve()),
        "overrides": list(overrides or []),
        "force": bool(force),
        "workdir": str(workdir.resolve()),
    }


def serve_retrain(
    cron: str,
    *,
    name: str = DEFAULT_DEPLOYMENT,
    params_file: Path = Path("params.yaml"),
    overrides: list[str] | None = None,
    workdir: Path = Path("."),
    force: bool = False,
) -> None:
    """Register the ``retrain`` deployment on ``cron`` and run its scheduled flow runs until interrupted.

    One flow run at a time (``limit=1``); the workspace lock also refuses a concurrent ``dvc repro``.
    """
    from prefect.deployments.runner import EntrypointType

    from flows.flows import retrain

    cron = validate_cron(cron)
    if not name or not isinstance(name, str):
        raise ValueError(f"expected a deployment name, got {name!r}")
    retrain.serve(
        name=name,
        cron=cron,
        parameters=deployment_parameters(params_file, overrides, workdir, force),
        tags=["retrainflow", "scheduled"],
        description=f"Scheduled retraining ({cron}): skips when data and params are unchanged since the champion.",
        limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
