"""`make gpu-check` cannot rot: its every step runs here on the CPU, small (`--dry-run`), and
its data handling (CIFAR-10 split into pieces, checked on arrival; a synthetic set) is real."""

import hashlib
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

GPU_CHECK = REPO / "bench" / "gpu_check.py"
sys.path.insert(0, str(GPU_CHECK.parent))
import gpu_check  # noqa: E402


def mnist_only(data_dir, tmp_path):
    folder = tmp_path / "brought"
    folder.mkdir()
    (folder / "mnist").symlink_to(data_dir / "mnist")
    return folder


def test_dry_run_on_cpu_runs_every_step(data_dir, tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--device", "cpu", "--dry-run", "--data",
         str(mnist_only(data_dir, tmp_path)), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    steps = {row["step"]: row for row in report["checks"]}
    assert steps["train mnist, eager"]["ok"] and steps["train mnist, eager"]["val_acc"] > 0.5
    assert steps["train mnist, eager"]["compile"] == "off"  # no CUDA graph on the CPU
    assert steps["train cifar10, eager"]["ok"] and steps["train cifar10, eager"]["images_per_s"] > 0
    for dataset in ("mnist", "cifar10"):
        cold, warm = steps[f"train {dataset}, cold cache, 1 epoch of 640"], steps[f"train {dataset}, eager"]
        assert cold["ok"] and cold["epochs"] == 1
        assert 0 < warm["first_step_s"] < warm["wall_s"]
    assert report["cifar10_data"].startswith("synthetic")
    assert steps["cpu → cpu checkpoint"]["ok"] and steps["SIGTERM on cpu"]["ok"]
    assert steps["single-rank gloo process group under torchrun"]["ok"]
    assert steps["pytest -m gpu"]["ok"] is not False
    assert "gpu-check on" in result.stdout


def test_split_cifar_archive_is_joined_and_checked(tmp_path):
    source = tmp_path / "archive.tar.gz"
    gpu_check.write_synthetic_cifar(source, train=100, test=20)
    data = tmp_path / "brought"
    (data / "cifar10").mkdir(parents=True)
    blob = source.read_bytes()
    for index, start in enumerate(range(0, len(blob), 50_000)):
        (data / f"{gpu_check.CIFAR}.part-{index:02d}").write_bytes(blob[start: start + 50_000])
    digest = hashlib.sha256(blob).hexdigest()
    (data / "SHA256SUMS").write_text(f"{digest}  {gpu_check.CIFAR}\n")
    folder, kind = gpu_check.prepare_data(data, tmp_path / "work")
    assert kind.startswith("joined from") and (folder / gpu_check.CIFAR).read_bytes() == blob
    (data / "SHA256SUMS").write_text(f"{'0' * 64}  {gpu_check.CIFAR}\n")
    with pytest.raises(SystemExit, match="do not join into the archive SHA256SUMS names"):
        gpu_check.prepare_data(data, tmp_path / "again")
