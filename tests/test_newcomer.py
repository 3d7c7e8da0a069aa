"""What a new user does first, in a fresh clone: `make train`, then `make test`. Training must
leave the checkout as `make test` expects it: nothing but git-ignored files, and nothing that
changes what ruff sees (a `wandb/` folder at the root made ruff sort `import wandb` as the
project's own)."""

import json
import re
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



FIGURES_CONFTEST = """
import tests.test_image  # collected, as under `make image-test`
from tests.conftest import pytest_collection_finish, pytest_terminal_summary
"""

FIGURES_TEST = """
from tests.test_image import FIGURES_KEY


def test_measures(request):
    request.config.cache.set(FIGURES_KEY, {"engine": "podman", "build_minutes": 3.14159,
                                           "host": {"train_images_per_second": 1234.5}})


def test_measures_nothing():
    pass
"""


def test_image_figures_come_before_the_final_counts_of_the_run_that_measured_them(pytester):
    """`.ci/run` ends with `make image-test`'s own last line, the counts; the build minutes and
    images/s its checks measured are a section of that report, and only of a run that measured
    them (figures left in the cache by an earlier run are not news)."""
    pytester.makeconftest(FIGURES_CONFTEST)
    pytester.makepyfile(test_figures=FIGURES_TEST)

    result = pytester.runpytest("-k", "test_measures and not nothing")
    result.assert_outcomes(passed=1, deselected=1)
    lines = result.outlines
    section = lines.index(next(line for line in lines if " image figures " in line))
    assert lines[section + 1:section + 4] == ["engine: podman", "build_minutes: 3.14",
                                              "host: train_images_per_second 1234.5"]
    assert re.fullmatch(r"=+ 1 passed, 1 deselected in .* =+", lines[-1]), lines[-1]

    result = pytester.runpytest("-k", "nothing")
    result.assert_outcomes(passed=1, deselected=1)
    assert not [line for line in result.outlines if "image figures" in line]
