import subprocess
import sys
from pathlib import Path

import yaml

from tasks.doctor import blocking, check_disk, check_pins, check_prefect_api, run_checks
from tasks.layout import Layout

ROOT = Path(__file__).resolve().parents[1]


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


def test_weights_check_names_the_file_keras_wants(keras_home):
    from tasks.config import params_from_dict
    from tasks.doctor import check_weights

    params = params_from_dict({"base": {"name": "mobilenet_v2"}, "image": {"size": [224, 224]}})
    missing = check_weights(params)
    assert missing.status == "warn"
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in missing.detail
    (keras_home / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5").write_bytes(
        b"x"
    )
    assert check_weights(params).status == "ok"
