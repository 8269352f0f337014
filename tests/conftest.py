"""Shared fixtures: an offline, quiet environment for every test; ../shared data and weights when present
(``shared_path``); tiny generated images (``imagegen``); tiny workspaces (``make_workspace``); the session's
Prefect server (``prefect_api_url``).

Tests take these as fixtures and never import this module (or any other module under tests/).
"""

from __future__ import annotations

import atexit
import copy
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETRAINFLOW_SHARED", PROJECT_ROOT.parent / "shared"))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# ------------------------------------------------------------------------------------------ the project, ../shared
def find_shared(*parts: str) -> Path:
    """``SHARED/<parts>`` (a dataset folder, a weights file), or skip the calling test with a reason naming that
    exact path when it is absent: a partial ../shared then skips only the tests it cannot serve, each saying why."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared, or set RETRAINFLOW_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared_path() -> Callable[..., Path]:
    """``shared_path(*parts)``: the path ``SHARED/<parts>``, or skip the test naming that path when it is absent.
    Usable from fixtures of any scope (module-scoped workspaces too)."""
    return find_shared


@pytest.fixture
def shared_dir() -> Path:
    """The ../shared folder itself; a test needing something in it should ask ``shared_path(...)`` for it."""
    return find_shared()


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The project's root folder (tasks/, flows/, dvc.yaml, params.yaml)."""
    return PROJECT_ROOT


@pytest.fixture
def keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Keras cache, so nothing is found there and no test depends on the user's ~/.keras."""
    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


# ------------------------------------------------------------------------------ tiny generated images (imagegen)
# Tiny generated images for tests: learnable classes, every kind of bad file. Never downloads anything.

# Colour classes are learnable by a tiny model in a few epochs.
CLASS_COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 60, 200),
    "yellow": (220, 210, 40),
}


def coloured_image(colour: tuple[int, int, int], size: int = 40, seed: int = 0) -> Image.Image:
    """A noisy image dominated by ``colour``, with a random darker rectangle (so no two are identical)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255)
    y0, x0 = rng.integers(0, size // 2, 2)
    arr[y0 : y0 + size // 3, x0 : x0 + size // 3] *= 0.5
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def make_class_folders(
    root: Path,
    classes: dict[str, int] | list[str] = ("red", "blue"),
    per_class: int = 12,
    size: int = 40,
    fmt: str = "PNG",
    seed: int = 0,
) -> Path:
    """``root/<class>/<class>_<i>.<ext>`` with learnable colour images; returns ``root``."""
    counts = classes if isinstance(classes, dict) else {c: per_class for c in classes}
    ext = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "GIF": "gif", "WEBP": "webp"}[fmt]
    for ci, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = CLASS_COLOURS.get(name, tuple(int(c) for c in np.random.default_rng(ci).integers(0, 255, 3)))
        for i in range(n):
            coloured_image(colour, size, seed=seed * 100_003 + ci * 10_007 + i).save(
                folder / f"{name}_{i}.{ext}", fmt
            )
    return root


def image_bytes(fmt: str = "PNG", size: int = 16, mode: str = "RGB", colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), colour if mode in ("RGB", "RGBA") else 128).save(buf, fmt)
    return buf.getvalue()


# ---- every kind of awkward or bad file (index / reliability tests); all tiny, made in memory.
def noisy_array(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """Random RGB uint8 pixels (incompressible, so truncating the encoded file really cuts pixel data)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg(orientation: int = 6, height: int = 24, width: int = 32, seed: int = 0) -> bytes:
    """A JPEG stored ``width`` x ``height`` whose EXIF says to display it with ``orientation`` (1-8)."""
    image = Image.fromarray(noisy_array(height, width, seed))
    exif = image.getexif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif, quality=95)


def _png(width: int, height: int, bit_depth: int, raw_scanlines: bytes) -> bytes:
    """A minimal RGB PNG written by hand (IHDR, one IDAT of ``raw_scanlines``, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw_scanlines))
        + chunk(b"IEND", b"")
    )


def png16_bytes(height: int = 12, width: int = 10, seed: int = 0) -> bytes:
    """A 16-bit-per-channel RGB PNG (written with raw zlib: Pillow cannot write 16-bit RGB)."""
    arr = np.random.default_rng(seed).integers(0, 65536, (height, width, 3)).astype(">u2")
    return _png(width, height, 16, b"".join(b"\x00" + row.tobytes() for row in arr))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` (a decompression bomb; never decode it)."""
    return _png(width, height, 8, b"\x00" * 64)


def animated_gif_bytes(size: int = 16) -> bytes:
    frames = [Image.new("RGB", (size, size), c).convert("P") for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def bad_image_files() -> dict[str, bytes]:
    """name -> bytes of files that must be REJECTED by the index (each for its own reason)."""
    jpeg = encode(Image.fromarray(noisy_array(48, 64)), "JPEG", quality=90)
    png = encode(Image.fromarray(noisy_array(48, 64)), "PNG")
    return {
        "zero_bytes.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "text.jpg": b"just some text, not an image\n" * 3,
        "page.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        "bomb.png": bomb_png(),
        "palette.bmp": encode(Image.fromarray(noisy_array()).convert("P"), "BMP"),
        "anim.webp": encode(
            Image.fromarray(noisy_array()), "WEBP", save_all=True, append_images=[Image.new("RGB", (32, 24))]
        ),
        "image.tiff": encode(Image.fromarray(noisy_array()), "TIFF"),
    }


def good_odd_image_files() -> dict[str, bytes]:
    """name -> bytes of unusual files that must be ACCEPTED (and decode to RGB)."""
    rgb = Image.fromarray(noisy_array())
    return {
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "grey.jpg": encode(rgb.convert("L"), "JPEG"),
        "png16.png": png16_bytes(),
        "palette_transparent.png": encode(rgb.convert("P"), "PNG", transparency=0),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "grey_alpha.png": encode(rgb.convert("LA"), "PNG"),
        "animated.gif": animated_gif_bytes(),
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
        "still.webp": encode(rgb, "WEBP", lossless=True),
        "plain.bmp": encode(rgb, "BMP"),
        "grey.bmp": encode(rgb.convert("L"), "BMP"),
        "rotated.jpg": exif_rotated_jpeg(6),
    }


@dataclass(frozen=True)
class ImageGen:
    """What the ``imagegen`` fixture gives: the tiny image generators (see each function's docstring)."""

    CLASS_COLOURS: Mapping[str, tuple[int, int, int]]
    coloured_image: Callable[..., Image.Image]
    make_class_folders: Callable[..., Path]
    image_bytes: Callable[..., bytes]
    noisy_array: Callable[..., np.ndarray]
    encode: Callable[..., bytes]
    exif_rotated_jpeg: Callable[..., bytes]
    png16_bytes: Callable[..., bytes]
    bomb_png: Callable[..., bytes]
    animated_gif_bytes: Callable[..., bytes]
    bad_image_files: Callable[[], dict[str, bytes]]
    good_odd_image_files: Callable[[], dict[str, bytes]]


IMAGEGEN = ImageGen(
    CLASS_COLOURS=types.MappingProxyType(CLASS_COLOURS),
    coloured_image=coloured_image,
    make_class_folders=make_class_folders,
    image_bytes=image_bytes,
    noisy_array=noisy_array,
    encode=encode,
    exif_rotated_jpeg=exif_rotated_jpeg,
    png16_bytes=png16_bytes,
    bomb_png=bomb_png,
    animated_gif_bytes=animated_gif_bytes,
    bad_image_files=bad_image_files,
    good_odd_image_files=good_odd_image_files,
)


@pytest.fixture(scope="session")
def imagegen() -> ImageGen:
    """Tiny generated images: ``make_class_folders`` (learnable colour classes), ``coloured_image``,
    ``CLASS_COLOURS``, ``encode``, ``noisy_array``, and every kind of awkward or bad file (``bad_image_files``,
    ``good_odd_image_files``, ``bomb_png``, ``exif_rotated_jpeg``, ``png16_bytes``, ...). Never downloads."""
    return IMAGEGEN


@pytest.fixture(params=sorted(good_odd_image_files()))
def good_odd_image(request: pytest.FixtureRequest) -> bytes:
    """Each unusual file that must be accepted (``imagegen.good_odd_image_files()``), one test per file name."""
    return good_odd_image_files()[request.param]


# -------------------------------------------------------------------------------------------- tiny workspaces
# A tiny, fast pipeline: random-weight MobileNetV2 0.35 at 32 px, one head, 2 + 1 epochs.
TINY_PARAMS = {
    "seed": 1,
    "data": {"root": "data/images", "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "workers": 1},
    "image": {"size": [32, 32]},
    "augment": {"passes": 1, "horizontal_flip": True},
    "base": {"name": "mobilenet_v2", "weights": "none", "alpha": 0.35},
    "features": {"batch_size": 16, "engine": "keras"},  # litert: tests/models/test_engines.py
    "top": {"heads": [{"name": "linear", "type": "linear"}], "epochs": 2, "batch_size": 16, "lr": 0.01},
    "finetune": {"epochs": 1, "unfreeze_blocks": 1, "batch_size": 8},
    "evaluate": {
        "batch_size": 16,
        "preview_images": 4,
        "min_accuracy": 0.0,
    },  # the first candidate is promoted
}


def write_tiny_workspace(root: Path, per_class: int = 12) -> Path:
    """``root/params.yaml`` (tiny params) and ``root/data/images/{red,blue}``."""
    make_class_folders(root / "data" / "images", ["red", "blue"], per_class=per_class, size=32)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def make_workspace() -> Callable[..., Path]:
    """``make_workspace(root, per_class=12)``: ``root/params.yaml`` (the tiny params, ``tiny_workspace_params``)
    and ``root/data/images/{red,blue}`` with ``per_class`` generated 32 px images each; returns ``root``."""
    return write_tiny_workspace


@pytest.fixture
def tiny_workspace_params() -> dict[str, Any]:
    """A copy of the tiny params ``make_workspace`` writes (random-weight MobileNetV2 0.35 at 32 px, one head,
    2 + 1 epochs)."""
    return copy.deepcopy(TINY_PARAMS)


# ------------------------------------------------------------------------------ the session's Prefect server
# One real Prefect API server for the whole test session (``prefect server start`` on a free 127.0.0.1 port).
# Starting a server takes about 6 s; a per-process temporary API 7-12 s each time. The orchestration tests
# (test_flows, test_dvc_pipeline, test_serve, ...) share this one server: ``prefect_api_url`` starts it on first
# use with its own PREFECT_HOME and SQLite database, and stops it when the test process exits.
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(home: Path) -> dict[str, str]:
    """Environment for a quiet, offline Prefect process with its own home."""
    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def client_env(api_url: str) -> dict[str, str]:
    """Environment for a subprocess (``retrainflow``, ``dvc repro``) that reports to the session server."""
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def local_server(timeout: float = 120.0) -> str:
    """Start a Prefect server and return its API URL (``http://127.0.0.1:PORT/api``); it is stopped at exit."""
    home = Path(tempfile.mkdtemp(prefix="retrainflow-prefect-"))
    port = _free_port()
    prefect = Path(sys.executable).with_name("prefect")
    log = open(home / "server.log", "w")  # noqa: SIM115 - kept open for the server's lifetime
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=server_env(home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(home, ignore_errors=True)

    # at exit, not at the session's teardown: Prefect's own exit handlers (registered later, so run first) still
    # send the flows' last log lines to it
    atexit.register(stop)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited early:\n{(home / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - local URL
                if resp.status == 200:
                    return url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(
        f"prefect server not healthy after {timeout}s:\n{(home / 'server.log').read_text()[-3000:]}"
    )


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """The API URL (``http://127.0.0.1:PORT/api``) of the session's Prefect server, started on first use."""
    return local_server()


@pytest.fixture(scope="session")
def prefect_client_env() -> Callable[[str], dict[str, str]]:
    """``prefect_client_env(api_url)``: the environment for a subprocess (``retrainflow``, ``dvc repro``) that
    reports to the Prefect API at ``api_url``."""
    return client_env


@pytest.fixture(scope="session")
def prefect_server_env() -> Callable[[Path], dict[str, str]]:
    """``prefect_server_env(home)``: the environment for a quiet, offline Prefect process with its own home."""
    return server_env
