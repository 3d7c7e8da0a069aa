"""Sweeps: the plan a file expands to, bad files refused before anything is written, trials run
K at a time, a stopped trial resumed, a changed file refused, the report, S3 and W&B."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from job.sweep import load_plan
from tests.conftest import CNN_JOB, run_cli
from tests.test_signals import wait_for
from tests.wandb_records import records

WAIT_S = 120

FOUR_TRIALS = """\
name: four
dataset: mnist
checkpoint_uri: {root}
fixed: {{net: fast, epochs: 1, limit-train: 2048, batch_size: 32, checkpoint_every_steps: 1,
        device: cpu, data_uri: {data}}}
random: {{count: 2, seed: 0, lr: {{min: 0.001, max: 0.03, scale: log}}}}
seeds: [0, 1]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def status(root: Path, index: int) -> dict:
    return json.loads((root / f"trial-{index:03d}" / "trial.json").read_text())


# ----------------------------------------------------------------------------------------------
# the plan


def test_the_plan_is_grid_then_random_draws_then_seeds(tmp_path):
    sweep_file = write(tmp_path / "mnist-lr.yaml", """\
dataset: mnist
checkpoint_uri: runs/sweeps/mnist-lr
fixed: {net: fast, epochs: 1, limit-train: 4096}
grid:
  batch-size: [128, 256]
random:
  count: 2
  seed: 0
  lr: {min: 0.001, max: 0.03, scale: log}
  epochs: {min: 1, max: 3}
seeds: [0, 1]
""".replace("epochs: 1, ", ""))
    plan = load_plan(str(sweep_file))
    assert plan.name == "mnist-lr" and plan.swept == ["batch_size", "lr", "epochs", "seed"]
    assert plan.log_scale == ["lr"]
    # random.Random(0): lr by exp(uniform(log min, log max)), 6 significant digits; epochs ints
    # (uniform draws 2.516 and 1.518 for epochs)
    draws = [{"lr": 0.0176731, "epochs": 3}, {"lr": 0.00418057, "epochs": 2}]
    assert plan.trials == [{"batch_size": batch, **draw, "seed": seed}
                           for batch in (128, 256) for draw in draws for seed in (0, 1)]
    assert load_plan(str(sweep_file)).identity() == plan.identity()  # a pure function of the file
    config = plan.config(3)
    assert (config.batch_size, config.lr, config.seed, config.net) == (128, 0.00418057, 1, "fast")
    assert config.checkpoint_uri == "runs/sweeps/mnist-lr/trial-003"
    assert config.run_name == "mnist-lr-trial-003"

    shown = run_cli("sweep", "plan", str(sweep_file))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "8 trials" in shown.stdout and "lr (log)" in shown.stdout
    table = [[cell.strip() for cell in line.split("│")[1:6]] for line in lines if "│" in line]
    assert table[3] == ["003", "128", "0.00418057", "2", "1"] and len(table) == 8, shown.stdout
    as_json = run_cli("sweep", "plan", str(sweep_file), "--json")
    assert json.loads(as_json.stdout)["trials"] == plan.identity()["trials"]
    assert not Path("runs/sweeps/mnist-lr").exists()


T0 = ("--trial", "0")
GOOD = """\
dataset: mnist
checkpoint_uri: ROOT
fixed: {epochs: 1}
grid: {lr: [0.01, 0.02]}
"""


@pytest.mark.parametrize(("text", "args", "message"), [
    (GOOD.replace("epochs: 1", "lrr: 1"), T0, "fixed: unknown option 'lrr' (did you mean lr?)"),
    (GOOD.replace("epochs: 1", "epochs: 0"), T0, "trial 0 (lr 0.01): --epochs must be at least 1"),
    (GOOD.replace("[0.01, 0.02]", "[0.01, -1]"), T0, "trial 1 (lr -1): --lr must be a positive"),
    (GOOD.replace("[0.01, 0.02]", "[]"), T0, "grid: lr must be a list of one value or more"),
    (GOOD.replace("[0.01, 0.02]", "[0.01, abc]"), T0, "grid: lr 'abc' is not a number"),
    (GOOD.replace("grid: {lr: [0.01, 0.02]}", "random: {count: 2, lr: {min: 0.1, max: 0.01}}"),
     T0, "random: lr: min 0.1 is greater than max 0.01"),
    (GOOD.replace("grid: {lr: [0.01, 0.02]}", "random: {count: 2, lr: {min: 0, max: 0.01, "
                  "scale: log}}"), T0, "random: lr: a log scale needs min > 0"),
    (GOOD.replace("grid: {lr: [0.01, 0.02]}", "random: {count: 0, lr: {min: 0.1, max: 1}}"),
     T0, "random: count must be a whole number, at least 1"),
    (GOOD.replace("epochs: 1", "checkpoint_uri: x"), T0, "checkpoint_uri is the sweep's own"),
    (GOOD.replace("grid:", "seeds: [0]\ngrid: {seed: [1]}\nx:"), T0, "unknown section 'x'"),
    (GOOD + "seeds: [0, 1]\n", ("--trial", "4"), "trial 4 is not in sweep bad: its 4 trials are 0 to 3"),
    (GOOD.replace("fixed: ", "fixed: ["), T0, "is not valid YAML"),
    (GOOD, (), "which trial? pass --trial N"),
], ids=["unknown-option", "refused-value", "refused-swept-value", "empty-grid-list", "not-a-number",
        "min-above-max", "log-min-not-positive", "count-0", "sweeps-own-option", "unknown-section",
        "trial-out-of-range", "bad-yaml", "no-trial"])
def test_a_bad_sweep_is_one_line_exit_2_and_creates_nothing(tmp_path, text, args, message):
    root = tmp_path / "root"
    sweep_file = write(tmp_path / "bad.yaml", text.replace("ROOT", str(root)))
    env = {k: v for k, v in os.environ.items() if k != "JOB_COMPLETION_INDEX"}
    result = run_cli("sweep", "run", str(sweep_file), *args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert not root.exists()


def test_a_missing_sweep_file_is_one_line(tmp_path):
    result = run_cli("sweep", "plan", str(tmp_path / "nothing.yaml"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "nothing.yaml (No such file or directory)" in result.stderr


# ----------------------------------------------------------------------------------------------
# four short trials: one stopped by SIGTERM, then all K at a time, then again


@pytest.fixture(scope="module")
def four(tmp_path_factory, data_dir):
    """Trial 1 alone, stopped by SIGTERM after its first checkpoint; then `--parallel 2`, which
    runs 0, 2 and 3 and resumes 1; then `--parallel 2` again, which finds nothing to do."""
    folder = tmp_path_factory.mktemp("sweep")
    root = folder / "root"
    sweep_file = write(folder / "four.yaml", FOUR_TRIALS.format(root=root, data=data_dir))
    trial = subprocess.Popen([str(CNN_JOB), "sweep", "run", str(sweep_file), "--trial", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for("trial 1's first checkpoint", (root / "trial-001" / "latest").exists, trial)
    trial.send_signal(signal.SIGTERM)
    out, err = trial.communicate(timeout=WAIT_S)
    stopped = {"returncode": trial.returncode, "stdout": out, "stderr": err,
               "status": status(root, 1)}
    parallel = run_cli("sweep", "run", str(sweep_file), "--parallel", "2")
    statuses = [status(root, index) for index in range(4)]
    again = run_cli("sweep", "run", str(sweep_file), "--parallel", "2")
    return {"root": root, "file": sweep_file, "folder": folder, "stopped": stopped,
            "parallel": parallel, "statuses": statuses, "again": again}


def test_a_trial_stopped_by_sigterm_exits_75_and_says_where(four):
    stopped = four["stopped"]
    assert stopped["returncode"] == 75, stopped["stderr"]
    assert stopped["status"]["status"] == "stopped" and stopped["status"]["epochs"] == 0
    last = stopped["stdout"].strip().splitlines()[-1]
    assert last.startswith(f"trial 001 stopped at epoch 0, step {stopped['status']['steps']} ")
    assert json.loads((four["root"] / "sweep.json").read_text())["swept"] == ["lr", "seed"]


def test_parallel_runs_every_trial_and_resumes_the_stopped_one(four):
    parallel = four["parallel"]
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    for index, trial_status in enumerate(four["statuses"]):
        assert trial_status["status"] == "finished" and trial_status["epochs"] == 1
        assert 0.1 < trial_status["val_acc"] <= 1 and trial_status["error"] is None
        assert f"trial {index:03d} finished: val_acc {trial_status['val_acc']:.2%}" in parallel.stdout
        # each child printed train's own summary lines, prefixed with its trial
        assert f"trial {index:03d} | model: {four['root']}/trial-{index:03d}/step-" in parallel.stdout
    assert four["statuses"][1]["settings"] == {"lr": 0.0176731, "seed": 1}
    resumed = [line for line in parallel.stdout.splitlines() if "resumed from" in line]
    assert resumed and all(line.startswith("trial 001 | ") for line in resumed)
    assert "sweep four: 4 finished, of 4;" in parallel.stdout


def test_a_second_parallel_run_skips_the_finished_trials(four):
    again = four["again"]
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("finished already") == 4 and " started " not in again.stdout
    assert [status(four["root"], i)["updated"] for i in range(4)] == [
        s["updated"] for s in four["statuses"]]


def test_a_changed_file_on_the_same_root_is_refused(four):
    changed = write(four["folder"] / "changed.yaml",
                    four["file"].read_text().replace("seeds: [0, 1]", "seeds: [0, 2]"))
    for args in (("--trial", "0"), ("--parallel", "2")):
        refused = run_cli("sweep", "run", str(changed), *args)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"{four['root']}/sweep.json holds another sweep's plan (trials differ" in refused.stderr
        assert "another checkpoint_uri, or run the original file" in refused.stderr


def test_the_report_table_json_and_plot(four):
    plot = four["folder"] / "four.png"
    shown = run_cli("sweep", "report", str(four["root"]), "--plot", str(plot))
    assert shown.returncode == 0, shown.stderr
    accuracies = sorted((s["val_acc"] for s in four["statuses"]), reverse=True)
    rows = [line for line in shown.stdout.splitlines() if "finished" in line]
    assert [float(row.split("│")[6].strip().rstrip("%")) for row in rows] == [
        round(a * 100, 2) for a in accuracies]
    assert "best: trial" in shown.stdout and "cnn-job evaluate" in shown.stdout

    as_json = json.loads(run_cli("sweep", "report", str(four["root"]), "--json").stdout)
    assert [row["val_acc"] for row in as_json] == accuracies
    assert {row["trial"]: row["settings"] for row in as_json} == {
        s["trial"]: s["settings"] for s in four["statuses"]}

    image = Image.open(plot)
    # a panel for lr and seed, and the learning curves
    assert image.format == "PNG" and image.size == (3 * 460, 44 + 340)
    assert len(image.convert("RGB").getcolors(maxcolors=100_000)) > 20  # drawn on, not blank


def test_the_report_of_a_root_without_a_sweep_is_one_line(tmp_path):
    result = run_cli("sweep", "report", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "holds no sweep (no sweep.json)" in result.stderr


# ----------------------------------------------------------------------------------------------
# S3 as the root, the trial from JOB_COMPLETION_INDEX; and W&B


def test_a_sweep_in_s3(s3, tmp_path, data_dir):
    root = f"s3://{s3.bucket}/sweeps/two"
    sweep_file = write(tmp_path / "two.yaml", f"""\
dataset: mnist
checkpoint_uri: {root}
fixed: {{net: fast, limit_train: 512, device: cpu, data_uri: {data_dir}}}
seeds: [0, 1]
""")
    assert run_cli("sweep", "plan", str(sweep_file)).returncode == 0
    # The trial takes the file's settings only: CNN_JOB_EPOCHS does not reach it; the machine's
    # cache folder does. Its closing line is also the pod's termination message.
    message = tmp_path / "termination-log"
    message.write_text("")
    trial = run_cli("sweep", "run", str(sweep_file),
                    env={"JOB_COMPLETION_INDEX": "1", "CNN_JOB_EPOCHS": "3",
                         "CNN_JOB_CACHE_DIR": str(tmp_path / "machine-cache"),
                         "CNN_JOB_TERMINATION_LOG": str(message)})
    assert trial.returncode == 0, trial.stderr
    assert any((tmp_path / "machine-cache" / "parsed").iterdir())
    assert trial.stdout.strip().splitlines()[-1].startswith("trial 001 finished: val_acc ")
    assert message.read_text() == trial.stdout.strip().splitlines()[-1]
    stored = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="sweeps/two/trial-001/trial.json")
                        ["Body"].read())
    assert stored["status"] == "finished" and stored["epochs"] == 1
    plan = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="sweeps/two/sweep.json")["Body"].read())
    assert plan["trials"] == [{"trial": 0, "settings": {"seed": 0}},
                              {"trial": 1, "settings": {"seed": 1}}]

    rows = json.loads(run_cli("sweep", "report", root, "--json").stdout)
    assert [(row["trial"], row["status"]) for row in rows] == [(1, "finished"), (0, "pending")]
    assert rows[0]["val_acc"] == stored["val_acc"]


def test_a_trial_is_a_wandb_run_in_the_sweeps_group(tmp_path, data_dir):
    sweep_file = write(tmp_path / "grouped.yaml", f"""\
name: grouped
dataset: mnist
checkpoint_uri: {tmp_path / "root"}
fixed: {{net: fast, limit_train: 256, device: cpu, data_uri: {data_dir}}}
grid: {{lr: [0.01]}}
""")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_PROJECT": "cnn-job-tests"}
    trial = run_cli("sweep", "run", str(sweep_file), "--trial", "0", env=env)
    assert trial.returncode == 0, trial.stderr
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    (run,) = [r.run for r in records(log) if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "grouped" and run.display_name == "grouped-trial-000"
