"""A screenshot of the dashboard's run-summary artifact from a real run (docs/dashboard_run_summary.png).

    python bench/dashboard_screenshot.py                      # a real retrain on 3 flower classes x 60 photos
    python bench/dashboard_screenshot.py --workspace DIR      # or a real `retrainflow run` in your workspace

It starts its own ``prefect server`` on a free 127.0.0.1 port (a temporary PREFECT_HOME, so nothing of yours is
touched), runs ``python -m flows.cli run`` against it, opens the run's ``run-summary`` artifact page
(``/artifacts/artifact/<id>``) in headless Chromium, trims the page to its content, shrinks it under
``--max-bytes`` and writes ``--out``; then it stops the server. The default demo copies the first 60 images of
daisy, dandelion and sunflower from ``../shared/datasets/flowers`` into a temporary workspace and trains with the
ImageNet MobileNetV2 weights from ``../shared/weights`` (about a minute on 2 cores).

Needs Chromium: ``apt-get update && apt-get install -y chromium`` (or pass ``--chromium PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETRAINFLOW_SHARED", ROOT.parent / "shared"))
FLOWERS = SHARED / "datasets" / "flowers"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
DEMO_CLASSES = ("daisy", "dandelion", "sunflower")
OUT = ROOT / "docs" / "dashboard_run_summary.png"


def demo_params(weights: Path) -> dict:
    """The project's defaults trimmed for a one-minute run: one clean + one augmented view, two heads, one
    fine-tuning epoch of the last block, 8 preview images."""
    return {
        "seed": 42,
        "data": {"root": "data/images", "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "augment": {"passes": 1},
        "base": {"name": "mobilenet_v2", "weights": str(weights)},
        "top": {
            "heads": [
                {"name": "linear", "type": "linear"},
                {"name": "dense64_dropout", "type": "dense", "units": [64], "dropout": 0.3},
            ],
            "epochs": 20,
            "batch_size": 16,
        },
        "finetune": {"epochs": 1, "unfreeze_blocks": 1, "batch_size": 16},
        "evaluate": {"preview_images": 8, "min_accuracy": 0.5},
    }


def make_demo_workspace(root: Path, per_class: int) -> Path:
    """``root/params.yaml`` and ``root/data/images/<class>/``: the first ``per_class`` files of each demo class."""
    for path in (FLOWERS, WEIGHTS):
        if not path.exists():
            sys.exit(
                f"error: {path} not found (../shared, or set RETRAINFLOW_SHARED; or pass --workspace DIR)"
            )
    for name in DEMO_CLASSES:
        target = root / "data" / "images" / name
        target.mkdir(parents=True)
        for src in sorted((FLOWERS / name).iterdir())[:per_class]:
            shutil.copy2(src, target / src.name)
    (root / "params.yaml").write_text(yaml.safe_dump(demo_params(WEIGHTS), sort_keys=False))
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(api: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: prefect server exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:  # noqa: S310 - local URL
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"error: prefect server not healthy after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server this script started (its own process group: the server and its workers)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_summary_artifact(api: str, flow_run_id: str) -> str:
    """The id of the flow run's newest ``run-summary`` artifact (through the REST API)."""
    body = {
        "artifacts": {"key": {"any_": ["run-summary"]}},
        "flow_runs": {"id": {"any_": [flow_run_id]}},
        "sort": "CREATED_DESC",
        "limit": 1,
    }
    request = urllib.request.Request(
        f"{api}/artifacts/filter",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - local URL
        found = json.loads(resp.read())
    if not found:
        sys.exit(f"error: flow run {flow_run_id} has no run-summary artifact")
    return str(found[0]["id"])


def find_chromium(given: str | None) -> str:
    for name in [given] if given else ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name) if name else None
        if path:
            return path
    sys.exit(
        "error: no chromium found: apt-get update && apt-get install -y chromium (or pass --chromium PATH)"
    )


def screenshot(chromium: str, url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
    cmd = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    cmd += [
        f"--virtual-time-budget={wait_ms}",  # the page renders from API calls after load
        f"--window-size={width},{height}",
        f"--screenshot={out}",
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not out.is_file():
        sys.exit(f"error: chromium failed ({done.returncode}):\n{done.stderr[-3000:]}")


def trim_to_content(image: Image.Image, margin: int = 24) -> Image.Image:
    """Cut the empty page below the content: the last row where the main column (between the sidebar and the
    details panel) differs from the background at the bottom of the page."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    h, w, _ = rgb.shape
    column = rgb[:, int(w * 0.2) : int(w * 0.75)]
    differs = (np.abs(column - rgb[h - 2, w // 2]).max(axis=2) > 12).any(axis=1)
    bottom = int(np.flatnonzero(differs)[-1]) if differs.any() else h
    return image.convert("RGB").crop((0, 0, w, min(h, bottom + margin)))


def shrink(image: Image.Image, out: Path, max_bytes: int, width: int) -> tuple[int, int, int]:
    """Write ``image`` to ``out`` at most ``width`` px wide and under ``max_bytes``: a 256-colour PNG (median-cut
    palette, Floyd-Steinberg dithering for the photos), narrower by 10 % each try until it fits.
    Returns (width, height, bytes)."""
    while True:
        scaled = image
        if image.width > width:
            scaled = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        palette = scaled.quantize(256, method=Image.Quantize.MEDIANCUT)
        scaled.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(out, optimize=True)
        size = out.stat().st_size
        if size <= max_bytes or width < 400:
            return scaled.width, scaled.height, size
        width = int(width * 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workspace", type=Path, help="run `retrainflow run` in this workspace (its params.yaml)"
    )
    parser.add_argument(
        "--params", type=Path, help="params file for --workspace (default: WORKSPACE/params.yaml)"
    )
    parser.add_argument("--force", action="store_true", help="retrain even when unchanged (--workspace)")
    parser.add_argument("--per-class", type=int, default=60, help="demo images per class (default 60)")
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"the PNG to write (default {OUT.relative_to(ROOT)})"
    )
    parser.add_argument(
        "--max-bytes", type=int, default=300_000, help="largest PNG to write (default 300000)"
    )
    parser.add_argument("--width", type=int, default=1000, help="widest PNG to write in px (default 1000)")
    parser.add_argument(
        "--max-height",
        type=int,
        default=2700,
        help="keep the top of the page, this many browser px (default 2700: status to the report images; 0: all)",
    )
    parser.add_argument("--window", default="1280,6000", help="browser window W,H (default 1280,6000)")
    parser.add_argument(
        "--wait-ms", type=int, default=20_000, help="time the page gets to render (default 20000)"
    )
    parser.add_argument("--chromium", help="the Chromium binary (default: chromium on PATH)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (workspace, server log)"
    )
    args = parser.parse_args()
    chromium = find_chromium(args.chromium)
    win_w, win_h = (int(v) for v in args.window.split(","))

    tmp = Path(tempfile.mkdtemp(prefix="retrainflow-screenshot-"))
    if args.workspace:
        workspace = args.workspace.resolve()
        params = (args.params or workspace / "params.yaml").resolve()
    else:
        workspace = make_demo_workspace(tmp / "workspace", args.per_class)
        params = workspace / "params.yaml"
    port = args.port or free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp / "prefect_home"
    home.mkdir()
    quiet = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    log = tmp / "server.log"
    prefect = Path(sys.executable).with_name("prefect")
    t0 = time.monotonic()
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [str(prefect if prefect.exists() else "prefect"), "server", "start", "--host", "127.0.0.1"]
            + ["--port", str(port)],
            env={
                **os.environ,
                **quiet,
                "PREFECT_UI_ENABLED": "true",
                "PREFECT_UI_API_URL": api,  # the dashboard's pages call this API from the browser
                "PREFECT_LOGGING_LEVEL": "WARNING",
            },
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_healthy(api, server, log)
        print(f"prefect server {api} up in {time.monotonic() - t0:.0f}s (log {log})", flush=True)
        cmd = [sys.executable, "-m", "flows.cli", "run", "--params", str(params), "--workdir", str(workspace)]
        cmd += ["--json"] + (["--force"] if args.force else [])
        env = {**os.environ, **quiet, "PREFECT_API_URL": api, "PYTHONPATH": str(ROOT)}
        print("running:", " ".join(cmd), flush=True)
        t1 = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(
                f"error: the run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        summary, _ = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{") :])
        print(f"run {summary['status']} in {time.monotonic() - t1:.0f}s: {summary.get('reason')}", flush=True)
        artifact = run_summary_artifact(api, summary["flow_run_id"])
        url = f"http://127.0.0.1:{port}/artifacts/artifact/{artifact}"
        raw = tmp / "page.png"
        screenshot(chromium, url, raw, win_w, win_h, args.wait_ms)
        with Image.open(raw) as page:
            image = trim_to_content(page)
        if args.max_height and image.height > args.max_height:
            image = image.crop((0, 0, image.width, args.max_height))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        w, h, size = shrink(image, args.out, args.max_bytes, args.width)
        print(f"{url}: page {image.width}x{image.height} -> {args.out} {w}x{h}, {size:,} bytes")
    finally:
        stop(server)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
