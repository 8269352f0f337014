"""Fixtures of the reliability suite (helpers live in ``relhelp.py`` and ``killpoints.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """The session's Prefect server (shared with the orchestration tests), current for flows run in-process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_api import local_server

    url = local_server()
    with temporary_settings({PREFECT_API_URL: url}):
        yield url
