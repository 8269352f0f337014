"""``python -m flows.cli``: the ``retrainflow`` console script."""

from flows.cli import app

app()
