"""``retrainflow doctor``: check the environment before a (3 a.m., unattended) run and say what to fix.

Each check is a small function returning a :class:`Check`; a ``fail`` blocks a run, a ``warn`` does not.
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from tasks.config import Params, ParamsError, load_params
from tasks.layout import Layout

Status = Literal["ok", "warn", "fail"]
MIN_FREE_BYTES = 2 * 1024**3
MIN_PYTHON: tuple[int, int] = (3, 11)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check(
            "python", "fail", f"Python {version}", "use Python 3.11 or newer (make setup picks python3.11)"
        )
    return Check("python", "ok", f"Python {version}")


def pinned_requirements(distribution: str = "retrainflow") -> dict[str, str]:
    """The ``name==version`` runtime pins of the installed project whose environment marker applies here."""
    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    for raw in metadata.requires(distribution) or []:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[req.name] = specs[0].version
    return pins


def check_pins() -> Check:
    try:
        pins = pinned_requirements()
    except metadata.PackageNotFoundError:
        return Check("pins", "fail", "retrainflow is not installed", "run `make setup`")
    wrong = []
    for name, wanted in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} missing (want {wanted})")
            continue
        if have != wanted:
            wrong.append(f"{name} {have} (want {wanted})")
    if wrong:
        return Check(
            "pins", "fail", "; ".join(wrong), "reinstall with `make setup` (rm .venv/.installed first)"
        )
    return Check("pins", "ok", f"{len(pins)} pinned packages match")


def check_params(params_file: Path, overrides: tuple[str, ...]) -> tuple[Check, Params | None]:
    try:
        params = load_params(params_file, overrides)
    except ParamsError as err:
        return Check("params", "fail", "; ".join(err.problems), f"fix {params_file}"), None
    return Check("params", "ok", f"{params_file} is valid"), params


def check_data(params: Params) -> Check:
    root = params.data.root
    if not root.is_dir():
        return Check(
            "data",
            "fail",
            f"data.root {str(root)!r} is not a folder",
            "set data.root or run `make demo-data`",
        )
    if params.data.source == "csv" and (params.data.csv is None or not params.data.csv.is_file()):
        return Check("data", "fail", f"data.csv {str(params.data.csv)!r} not found", "set data.csv")
    return Check("data", "ok", f"data.root {root}")


def can_download(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url`` answers a HEAD request, through urllib as Keras downloads (proxy settings included)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as resp:  # noqa: S310
            return resp.status < 400
    except (OSError, ValueError):  # URLError, HTTPError, timeouts, a malformed proxy
        return False


def check_weights(params: Params, download: Callable[[str], bool] = can_download) -> Check:
    """Are the base's weights available without a download? ImageNet weights neither in the Keras cache nor
    downloadable (``download(url)`` is False: an offline machine) block a run: the features stage would fail."""
    from tasks.inputs import resolve_inputs
    from tasks.layout import Layout
    from tasks.models.bases import imagenet_weights_file, keras_cache_dir

    weights = params.base.weights
    if weights == "none":
        return Check(
            "weights", "warn", "base.weights is none: random initialisation", "use imagenet for real runs"
        )
    if weights != "imagenet":
        return Check("weights", "ok", f"weights file {weights}")
    try:
        inputs = resolve_inputs(params, Layout(Path(".")))  # the size and alpha, as the stages resolve them
        wanted = imagenet_weights_file(inputs.base, inputs.alpha, inputs.image_size)
    except ValueError as err:
        return Check("weights", "fail", str(err), "fix base / image params")
    cache = keras_cache_dir()
    if (cache / wanted.name).is_file():
        return Check("weights", "ok", f"{wanted.name} in {cache}")
    fix = (
        f"copy {wanted.name} into {cache} (or point KERAS_HOME at a folder whose models/ holds it), "
        f"or set base.weights to the file's path (--set base.weights=/path/to/{wanted.name})"
    )
    if download(wanted.url):
        return Check(
            "weights", "warn", f"{wanted.name} not in {cache}: Keras will download it from {wanted.url}", fix
        )
    return Check(
        "weights",
        "fail",
        f"{wanted.name} not in {cache} and {wanted.url} is unreachable: the features stage cannot load "
        f"the ImageNet weights of {inputs.base.name}",
        fix,
    )


def check_engine(params: Params) -> Check:
    """Which engine ``features.engine`` gives the frozen base here, and why (litert asked for and not
    installed: a failure, with the fix)."""
    from tasks.errors import InputError
    from tasks.models.engines import choose_engine

    try:
        choice = choose_engine(params.features.engine)
    except InputError as err:
        return Check("engine", "fail", str(err), "pip install ai-edge-litert (or features.engine: keras)")
    return Check("engine", "ok", f"features on {choice.key or choice.name} ({choice.reason})")


def check_dvc(root: Path) -> Check:
    if shutil.which("dvc") is None and not (Path(sys.prefix) / "bin" / "dvc").exists():
        return Check("dvc", "fail", "dvc executable not found", "run `make setup`")
    if not (root / ".dvc").is_dir():
        return Check(
            "dvc", "warn", f"{root.resolve()} is not a DVC repository", "run `dvc init` (make demo does)"
        )
    return Check("dvc", "ok", "DVC initialised")


def check_prefect_api(timeout: float = 3.0) -> Check:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        try:
            from prefect.settings import PREFECT_API_URL

            url = PREFECT_API_URL.value()
        except Exception:
            url = None
    if not url:
        return Check(
            "prefect",
            "warn",
            "no PREFECT_API_URL: each run starts a temporary local API (7–12 s) and is not kept",
            "run `make dashboard` and export the PREFECT_API_URL it prints",
        )
    if not url.startswith(("http://", "https://")):
        return Check(
            "prefect", "fail", f"PREFECT_API_URL is not an http(s) URL: {url!r}", "fix PREFECT_API_URL"
        )
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
            ok = resp.status == 200
    except OSError as err:
        return Check("prefect", "fail", f"{url} unreachable ({err})", "start it with `make dashboard`")
    return Check("prefect", "ok" if ok else "fail", f"{url} healthy" if ok else f"{url} unhealthy")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (a cache folder may not exist before the first run)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(path: Path, min_free: int = MIN_FREE_BYTES, what: str = "feature cache") -> Check:
    """Free space where ``what`` is written (the filesystem holding ``path``, created or not)."""
    free = shutil.disk_usage(_existing(path)).free
    gib = free / 1024**3
    name = "disk" if what == "feature cache" else f"disk ({what})"
    if free < min_free:
        return Check(
            name,
            "fail",
            f"{gib:.1f} GiB free for the {what} at {path}",
            f"free at least {min_free / 1024**3:.0f} GiB there, or set features.cache_dir to a roomier disk",
        )
    return Check(name, "ok", f"{gib:.1f} GiB free for the {what} at {path}")


def disk_checks(params: Params | None, layout: Layout, min_free: int = MIN_FREE_BYTES) -> list[Check]:
    """The feature cache's location (``features.cache_dir``, else the workspace cache: the big writer), and the
    workspace root too when it is on another filesystem (models, reports)."""
    from tasks.inputs import cache_root

    cache = cache_root(params, layout) if params is not None else layout.features_cache
    checks = [check_disk(cache, min_free, "feature cache")]
    if os.stat(_existing(cache)).st_dev != os.stat(_existing(layout.root)).st_dev:
        checks.append(check_disk(layout.root, min_free, "workspace"))
    return checks


def run_checks(params_file: Path, overrides: tuple[str, ...], layout: Layout) -> list[Check]:
    checks = [check_python(), check_pins()]
    params_check, params = check_params(params_file, overrides)
    checks.append(params_check)
    if params is not None:
        checks += [check_data(params), check_weights(params), check_engine(params)]
    checks += [check_dvc(layout.root), check_prefect_api(), *disk_checks(params, layout)]
    return checks


def blocking(checks: list[Check]) -> bool:
    return any(c.status == "fail" for c in checks)
