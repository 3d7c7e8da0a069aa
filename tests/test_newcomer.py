"""What a new user does first, in a fresh clone: `make train`, then `make test`. Training must
leave the checkout as `make test` expects it: nothing but git-ignored files, and nothing that
changes what ruff sees (a `wandb/` folder at the root made ruff sort `import wandb` as the
project's own)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

RUFF = Path(sys.executable).parent / "ruff"


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                          timeout=60).stdout


def test_training_in_a_fresh_clone_leaves_it_lint_clean_and_says_what_to_run_next(tmp_path, data_dir):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    git("clone", "-q", str(REPO), str(clone), cwd=tmp_path)

    # `make train`, shortened: the default checkpoint folder, W&B offline (no key here).
    result = run_cli("train", "mnist", "--limit-train", "512", "--epochs", "1", "--device", "cpu",
                     "--data-uri", str(data_dir), "--summary-json", str(tmp_path / "s.json"),
                     env={"WANDB_MODE": "offline", "WANDB_DIR": ""}, cwd=clone)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["checkpoint"].startswith("runs/mnist/checkpoints/step-")
    assert result.stdout.splitlines()[-2:] == [
        f"model: {summary['checkpoint']} (val_acc {summary['final_val_acc']:.2%})",
        "next: cnn-job evaluate runs/mnist/checkpoints",
    ]

    # `make test`'s first command, and the checkout as git sees it.
    assert not (clone / "wandb").exists()
    assert list((clone / "runs" / "mnist" / "wandb").glob("offline-run-*"))
    lint = subprocess.run([str(RUFF), "check", "."], cwd=clone, capture_output=True, text=True,
                          timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert git("status", "--porcelain", cwd=clone) == ""
