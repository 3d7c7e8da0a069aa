"""`cnn-job --version`: which build this is, and the same facts in what a run records."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess

import pytest
import torch

from tests.conftest import REPO, run_cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=REPO, check=True).stdout.strip()


def version_json(**env: str) -> dict:
    result = run_cli("--version", "--json", env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return json.loads(result.stdout)


def test_version_names_the_build_and_the_software_under_it():
    facts = version_json()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert facts["cnn_job"] == project["version"] == importlib.metadata.version("cnn-job")
    assert facts["git_commit"] == head()
    assert facts["python"] == platform.python_version()
    assert facts["torch"] == torch.__version__ and facts["cuda"] == torch.version.cuda
    if torch.backends.cudnn.is_available():  # 92600 → "9.26.0"
        major, minor, patch = map(int, facts["cudnn"].split("."))
        assert major * (10000 if major >= 9 else 1000) + minor * 100 + patch == (
            torch.backends.cudnn.version())
    else:
        assert facts["cudnn"] is None
    assert facts["gpu_visible"] == torch.cuda.is_available()
    assert len(facts["gpus"]) == torch.cuda.device_count()

    # The same facts, as lines for a person.
    text = run_cli("--version")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"cnn-job {project['version']}" and lines[1] == f"commit  {head()}"
    assert lines[3].startswith(f"torch   {torch.__version__} (")
    assert lines[4] == "GPU     " + (", ".join(facts["gpus"]) or "none visible")


def test_the_image_build_names_its_commit():
    # The image's build sets GIT_COMMIT (it has no .git): it wins over the checkout's.
    assert version_json(GIT_COMMIT="0123456789abcdef")["git_commit"] == "0123456789abcdef"


def test_json_without_version_is_one_line_and_status_2():
    for args in (["--json"], ["--json", "train", "mnist"]):
        result = run_cli(*args)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            "error: Invalid value for '--json': it goes with --version (see 'cnn-job --help')"]


def test_a_runs_summary_and_wandb_config_carry_the_same_facts(tmp_path, data_dir):
    summary_path = tmp_path / "summary.json"
    result = run_cli("train", "mnist", "--device", "cpu", "--epochs", "1", "--limit-train", "640",
                     "--data-uri", str(data_dir), "--checkpoint-uri", str(tmp_path / "runs"),
                     "--cache-dir", str(tmp_path / "cache"), "--summary-json", str(summary_path))
    assert result.returncode == 0, result.stderr
    summary = json.loads(summary_path.read_text())
    facts = version_json()
    assert summary["git_commit"] == facts["git_commit"]
    # versions is what the W&B config gets too (train.start_tracker: config + environment)
    assert summary["versions"] == {key: facts[key]
                                   for key in ("cnn_job", "python", "torch", "cuda", "cudnn")}
