"""The retrainflow CLI on a disk that fills up: from the N-th ``np.save`` on (the feature-shard writer), every call
writes half of its bytes and raises ENOSPC, as a full filesystem does, and stays full.

    python diskfull_cli.py N RETRAINFLOW-ARGS...        # e.g. 2 stage features --params params.yaml

Each failing call prints ``np.save failed: call K`` (inside a Prefect task run, as a log line on stderr).
"""

from __future__ import annotations

import errno
import io
import sys

import numpy as np

REAL_SAVE = np.save


def main(argv: list[str]) -> None:
    fail_from = int(argv[1])
    calls = 0

    def full_disk_save(file, arr, allow_pickle=True, **kwargs):
        nonlocal calls
        calls += 1
        if calls < fail_from:
            return REAL_SAVE(file, arr, allow_pickle=allow_pickle, **kwargs)
        buf = io.BytesIO()
        REAL_SAVE(buf, arr, allow_pickle=allow_pickle, **kwargs)
        file.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        print(f"np.save failed: call {calls}", file=sys.stderr, flush=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    np.save = full_disk_save
    from flows.cli import app

    sys.argv = ["retrainflow", *argv[2:]]
    app()


if __name__ == "__main__":
    main(sys.argv)
