"""bench/optim_speed.py cannot rot: a few timed steps of every net, flat and per-tensor, each
built by train's own set-up."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_a_short_run_times_both_settings_of_every_net(tmp_path):
    out = tmp_path / "runs.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "optim_speed.py"), "--runs", "1", "--steps", "10",
         "--fast-steps", "10", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(out.read_text())
    nets = ("mnist seed", "cifar10 seed", "cifar10 fast")
    assert [(row["net"], row["flat"]) for row in rows] == [
        (net, flat) for net in nets for flat in (True, False)]
    assert [row["batch"] for row in rows] == [64, 64, 64, 64, 256, 256]
    assert all(row["images_per_second"] > 0 and row["update_us"] > 0 for row in rows)
    assert "| cifar10 fast | 256 |" in result.stdout  # the table's row
