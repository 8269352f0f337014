"""A newcomer's first run, cold, with the two cores kept busy: does `retrainflow run` come up first time?

Each case runs `retrainflow run` on a tiny generated workspace in a fresh process with nothing compiled (an empty
byte-code cache, none written: every module is compiled from source, as in a fresh venv) and a fresh
PREFECT_HOME (a new SQLite database and its migrations), while ``--hog`` processes spin on the CPU:
- ``prefect default 20 s``: Prefect's temporary API with Prefect's own start-up timeout (what `make demo` had);
- ``retrainflow default``: the temporary API with the CLI's cold-start timeout (flows/cli/defaults.py);
- ``--with-server``: the local `prefect server` that `make demo` now starts and stops.
It prints, per case, the exit code, the wall time and the last line; the baseline (Prefect's default) is measured
in the same run. Usage: ``.venv/bin/python bench/cold_start.py [--hog 2] [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

RETRAINFLOW = Path(sys.executable).with_name("retrainflow")
CASES = {
    "prefect default 20 s": (["run"], {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "20"}),
    "retrainflow default": (["run"], {}),
    "--with-server": (["run", "--with-server"], {}),
}

# The tests' tiny workspace (tests/conftest.py, the make_workspace fixture): random-weight MobileNetV2 0.35 at
# 32 px, one head, 2 + 1 epochs, on 12 generated 32 px images per colour class.
TINY_PARAMS = {
    "seed": 1,
    "data": {"root": "data/images", "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "workers": 1},
    "image": {"size": [32, 32]},
    "augment": {"passes": 1, "horizontal_flip": True},
    "base": {"name": "mobilenet_v2", "weights": "none", "alpha": 0.35},
    "features": {"batch_size": 16},
    "top": {"heads": [{"name": "linear", "type": "linear"}], "epochs": 2, "batch_size": 16, "lr": 0.01},
    "finetune": {"epochs": 1, "unfreeze_blocks": 1, "batch_size": 8},
    "evaluate": {
        "batch_size": 16,
        "preview_images": 4,
        "min_accuracy": 0.0,
    },  # the first candidate is promoted
}
CLASS_COLOURS = {"red": (200, 40, 40), "blue": (40, 60, 200)}


def make_workspace(root: Path, per_class: int = 12, size: int = 32) -> Path:
    """``root/params.yaml`` (tiny params) and ``root/data/images/{red,blue}``: noisy images dominated by the class
    colour, each with a random darker rectangle (the same files as the tests' ``make_workspace``)."""
    for ci, (name, colour) in enumerate(CLASS_COLOURS.items()):
        folder = root / "data" / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng(ci * 10_007 + i)
            arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255)
            y0, x0 = rng.integers(0, size // 2, 2)
            arr[y0 : y0 + size // 3, x0 : x0 + size // 3] *= 0.5
            Image.fromarray(arr.astype(np.uint8), "RGB").save(folder / f"{name}_{i}.png", "PNG")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    return root


def _spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def cold_run(args: list[str], extra: dict[str, str], scratch: Path) -> tuple[int, float, str]:
    ws = make_workspace(Path(tempfile.mkdtemp(dir=scratch)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPYCACHEPREFIX": tempfile.mkdtemp(dir=scratch),
        "PREFECT_HOME": tempfile.mkdtemp(dir=scratch),
        **extra,
    }
    start = time.perf_counter()
    proc = subprocess.run([str(RETRAINFLOW), *args], cwd=ws, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if line.startswith(("retrain ", "error:"))), lines[-1:])
    return proc.returncode, seconds, str(last)[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hog", type=int, default=2, help="CPU-spinning processes (default 2: both cores)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    opts = parser.parse_args()
    print(f"host: {os.cpu_count()} cores; hog: {opts.hog} spinning processes; repeats: {opts.repeats}")
    with tempfile.TemporaryDirectory(prefix="cold-start-") as scratch:
        hogs = [multiprocessing.Process(target=_spin, args=(time.time() + 3600,)) for _ in range(opts.hog)]
        for hog in hogs:
            hog.start()
        try:
            results = {}
            for _ in range(opts.repeats):
                for name in opts.cases:
                    args, extra = CASES[name]
                    code, seconds, last = cold_run(args, extra, Path(scratch))
                    results.setdefault(name, []).append((code, seconds))
                    print(f"{name:<22} exit {code}  {seconds:6.1f} s  {last}", flush=True)
        finally:
            for hog in hogs:
                hog.terminate()
    for name, runs in results.items():
        ok = sum(code == 0 for code, _ in runs)
        print(
            f"summary {name:<22} passed {ok}/{len(runs)}  median {sorted(s for _, s in runs)[len(runs) // 2]:.1f} s"
        )


if __name__ == "__main__":
    main()
