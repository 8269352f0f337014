import subprocess
import sys
from pathlib import Path

import yaml

from tasks.doctor import blocking, check_disk, check_pins, check_prefect_api, run_checks
from tasks.layout import Layout

ROOT = Path(__file__).resolve().parents[2]


def _params(tmp_path: Path, **data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(
        yaml.safe_dump({"data": {"root": str(tmp_path / "imgs"), **data}, "base": {"weights": "none"}})
    )
    return path


def test_installed_versions_match_the_pins():
    check = check_pins()
    assert check.status == "ok", check.detail


def test_unreachable_prefect_api_blocks(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    check = check_prefect_api(timeout=1)
    assert check.status == "fail" and "unreachable" in check.detail


def test_too_little_disk_blocks(tmp_path):
    assert check_disk(tmp_path, min_free=1 << 60).status == "fail"
    assert check_disk(tmp_path, min_free=1).status == "ok"
    assert check_disk(tmp_path / "not" / "yet", min_free=1).status == "ok"  # measured where it will be


def test_missing_data_root_and_bad_param_are_reported(tmp_path):
    checks = {c.name: c for c in run_checks(_params(tmp_path), (), Layout(tmp_path))}
    assert checks["data"].status == "fail" and "imgs" in checks["data"].detail
    assert blocking(list(checks.values()))
    checks = {c.name: c for c in run_checks(_params(tmp_path), ("top.lr=-1",), Layout(tmp_path))}
    assert checks["params"].status == "fail" and "top.lr" in checks["params"].detail


def test_doctor_cli_exit_codes(tmp_path):
    (tmp_path / "imgs").mkdir()
    env_cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "doctor",
        "--params",
        str(_params(tmp_path)),
        "-w",
        str(tmp_path),
    ]
    ok = subprocess.run(
        env_cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(
        [*env_cmd, "--set", "augment.zoom_range=big"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert "augment.zoom_range" in bad.stdout + bad.stderr


MOBILENET_V2_224 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def test_missing_imagenet_weights_block_offline_and_name_the_fix(keras_home):
    from tasks.config import params_from_dict
    from tasks.doctor import check_weights

    params = params_from_dict({"base": {"name": "mobilenet_v2"}, "image": {"size": [224, 224]}})
    asked = []
    offline = check_weights(params, download=lambda url: asked.append(url) or False)
    assert offline.status == "fail" and blocking([offline])
    assert MOBILENET_V2_224 in offline.detail and "unreachable" in offline.detail
    assert asked and asked[0].endswith(MOBILENET_V2_224)
    assert str(keras_home / "models") in offline.fix and "base.weights" in offline.fix
    online = check_weights(params, download=lambda url: True)  # Keras will download it: not blocking
    assert online.status == "warn" and MOBILENET_V2_224 in online.detail and not blocking([online])
    (keras_home / "models" / MOBILENET_V2_224).write_bytes(b"x")
    assert check_weights(params, download=lambda url: False).status == "ok"


def test_doctor_cli_blocks_when_weights_cannot_be_downloaded(tmp_path):
    """Through the CLI with an empty Keras cache and every download failing (a proxy nobody listens on)."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "keras" / "models").mkdir(parents=True)
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "data": {"root": str(tmp_path / "imgs")},
                "base": {"weights": "imagenet"},
                "image": {"size": None},
            }
        )
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "KERAS_HOME": str(tmp_path / "keras"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "COLUMNS": "400",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "doctor", "--params", str(params), "-w", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip("│ ").startswith("weights "))
    row = [lines[first]]  # the table wraps a row over the next lines, whose first cell is empty
    for line in lines[first + 1 :]:
        if not line.startswith("│") or line.split("│")[1].strip():
            break
        row.append(line)
    text = " ".join(row)
    assert "FAIL" in row[0] and MOBILENET_V2_224 in row[0], row
    assert "unreachable" in text and "base.weights" in text, text
    assert "blocked" in proc.stderr


def test_disk_check_looks_at_the_feature_cache(tmp_path, monkeypatch):
    """features.cache_dir elsewhere (not created yet): the free space that counts is the cache's."""
    import shutil

    import tasks.doctor as doctor

    (tmp_path / "imgs").mkdir()
    cache_fs = tmp_path / "big_disk"
    cache_fs.mkdir()
    params = _params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["features"] = {"cache_dir": str(cache_fs / "retrainflow" / "features")}
    params.write_text(yaml.safe_dump(raw))
    real = shutil.disk_usage
    seen = []

    def usage(path):
        seen.append(Path(path))
        full = Path(path) == cache_fs  # only the cache's filesystem is full
        return real(path)._replace(free=0) if full else real(path)

    monkeypatch.setattr(doctor.shutil, "disk_usage", usage)
    checks = {c.name: c for c in run_checks(params, (), Layout(tmp_path))}
    assert cache_fs in seen  # the nearest existing folder of the cache dir
    assert checks["disk"].status == "fail" and "retrainflow/features" in checks["disk"].detail
    assert "features.cache_dir" in checks["disk"].fix
    raw["features"] = {"cache_dir": None}  # the workspace cache: cache/features under the workspace
    params.write_text(yaml.safe_dump(raw))
    checks = {c.name: c for c in run_checks(params, (), Layout(tmp_path))}
    assert checks["disk"].status == "ok" and str(Layout(tmp_path).features_cache) in checks["disk"].detail
