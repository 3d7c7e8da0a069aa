"""Sweeps: the plan a file expands to, bad files refused before anything is written, trials run
K at a time, a stopped trial resumed, a changed file refused, the report, S3 and W&B; early
stopping (ASHA through a preemption, median), and --parallel's bookkeeping beside another live
job, a child out of storage, a signal, and its own death."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from job.sweep import EarlyStop, claim, load_plan
from tests.conftest import CNN_JOB, run_cli
from tests.test_multinode import alive, free_port
from tests.test_signals import wait_for
from tests.wandb_records import OfflineRun, records

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


def stop_after_first_checkpoint(sweep_file: Path, root: Path, index: int) -> dict:
    """Trial `index` alone, stopped by SIGTERM once its first checkpoint is written."""
    trial = subprocess.Popen([str(CNN_JOB), "sweep", "run", str(sweep_file), "--trial", str(index)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(f"trial {index}'s first checkpoint", (root / f"trial-{index:03d}" / "latest").exists,
             trial)
    trial.send_signal(signal.SIGTERM)
    out, err = trial.communicate(timeout=WAIT_S)
    return {"returncode": trial.returncode, "stdout": out, "stderr": err,
            "status": status(root, index)}


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
    (GOOD.replace("epochs: 1", "resume: never"), T0, "resume is the sweep's own"),
    (GOOD.replace("grid:", "seeds: [0]\ngrid: {seed: [1]}\nx:"), T0, "unknown section 'x'"),
    (GOOD + "seeds: [0, 1]\n", ("--trial", "4"), "trial 4 is not in sweep bad: its 4 trials are 0 to 3"),
    (GOOD.replace("fixed: ", "fixed: ["), T0, "is not valid YAML"),
    (GOOD, (), "which trial? pass --trial N"),
    (GOOD.replace("epochs: 1", "epochs: 1, epochs: 2"), T0,
     "epochs is given twice (line 3); give each key once"),
    (GOOD + "dataset: cifar10\n", T0, "dataset is given twice (line 5)"),
    (GOOD.replace("ROOT", '""'), T0, "checkpoint_uri is empty; give a folder or s3://"),
    (GOOD + "early_stop: {method: hyperband}\n", T0, "early_stop: method must be asha or median"),
    (GOOD + "early_stop: {method: asha, reduction_factor: 1}\n", T0,
     "early_stop: reduction_factor must be a whole number, at least 2 (got 1)"),
    (GOOD + "early_stop: {method: median, metric: loss}\n", T0,
     "early_stop: metric must be val_acc or val_loss (got 'loss')"),
], ids=["unknown-option", "refused-value", "refused-swept-value", "empty-grid-list", "not-a-number",
        "min-above-max", "log-min-not-positive", "count-0", "sweeps-own-option", "sweeps-own-resume",
        "unknown-section", "trial-out-of-range", "bad-yaml", "no-trial", "duplicate-option",
        "duplicate-section", "empty-root", "unknown-early-stop", "reduction-factor-1", "unknown-metric"])
def test_a_bad_sweep_is_one_line_exit_2_and_creates_nothing(tmp_path, text, args, message):
    root = tmp_path / "root"
    sweep_file = write(tmp_path / "bad.yaml", text.replace("ROOT", str(root)))
    env = {k: v for k, v in os.environ.items() if k != "JOB_COMPLETION_INDEX"}
    result = run_cli("sweep", "run", str(sweep_file), *args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert not root.exists()


@pytest.mark.parametrize(("text", "message"), [
    (GOOD.replace("ROOT", "s3://bucket/a/../x"), "checkpoint_uri s3://bucket/a/../x: a path "
     "segment is empty, '.' or '..'"),
    # refused before anything is drawn: a million trials would take minutes and gigabytes
    (GOOD.replace("grid: {lr: [0.01, 0.02]}", "random: {count: 1000000, lr: {min: 0.001, max: "
                  "0.1}}\nseeds: [0, 1]"),
     "2000000 trials (grid 1 × random 1000000 × seeds 2) is more than a sweep's 10000; split it "
     "into sweeps of at most 10000 trials, each a file with its own checkpoint_uri"),
], ids=["dot-dot-segment", "too-many-trials"])
def test_sweep_plan_refuses_what_run_would_in_one_line(tmp_path, text, message):
    sweep_file = write(tmp_path / "bad.yaml", text.replace("ROOT", str(tmp_path / "root")))
    result = run_cli("sweep", "plan", str(sweep_file), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


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
    stopped = stop_after_first_checkpoint(sweep_file, root, 1)
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


@pytest.mark.parametrize(("trial_json", "message"), [
    (None, "is a file, not a sweep's root: give the sweep's checkpoint_uri"),
    ("[1, 2]", "trial-000/trial.json is not a trial status this job wrote (not a JSON object)"),
    ('{"status": 5}', "(status 5 is not one of running, finished, pruned"),
    ('{"val_acc": "high"}', "(status None is not one of"),
    ('{"status": "finished", "val_acc": "high"}', "(val_acc 'high' is not a number)"),
    ('{"status": "pruned", "pruned": {"epoch": "one"}}', "(pruned is not an epoch and a reason)"),
    ('{"status": "running", "history": [{"epoch": 1, "val_acc": "x"}]}',
     "(history holds a metric that is not a number)"),
], ids=["a-file", "a-list", "status-5", "no-status", "val-acc-text", "pruned-no-reason",
        "history-text"])
def test_the_report_of_anything_malformed_is_one_line(tmp_path, trial_json, message):
    sweep_file = write(tmp_path / "good.yaml", GOOD.replace("ROOT", str(tmp_path / "root")))
    claim(load_plan(str(sweep_file)))  # sweep.json, as the first trial writes it
    target = tmp_path / "root"
    if trial_json is None:
        target = tmp_path / "root" / "sweep.json"
    else:
        (tmp_path / "root" / "trial-000").mkdir()
        (tmp_path / "root" / "trial-000" / "trial.json").write_text(trial_json)
    for args in ((), ("--json",)):
        result = run_cli("sweep", "report", str(target), *args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert result.stdout == ""


# ----------------------------------------------------------------------------------------------
# S3 as the root, the trial from JOB_COMPLETION_INDEX; and W&B


def test_a_sweep_in_s3(s3, tmp_path, data_dir):
    root = f"s3://{s3.bucket}/sweeps/two"
    sweep_file = write(tmp_path / "two.yaml", f"""\
dataset: mnist
checkpoint_uri: {root}
fixed: {{net: fast, epochs: 2, limit_train: 512, device: cpu, data_uri: {data_dir}}}
seeds: [0, 1]
early_stop: {{method: median, min_trials: 1}}
""")
    assert run_cli("sweep", "plan", str(sweep_file)).returncode == 0
    # The machine's cache folder reaches the trial; CNN_JOB_EPOCHS is accepted as it agrees
    # with the file. Its closing line is also the pod's termination message.
    message = tmp_path / "termination-log"
    message.write_text("")
    trial = run_cli("sweep", "run", str(sweep_file),
                    env={"JOB_COMPLETION_INDEX": "1", "CNN_JOB_EPOCHS": "2",
                         "CNN_JOB_CACHE_DIR": str(tmp_path / "machine-cache"),
                         "CNN_JOB_TERMINATION_LOG": str(message)})
    assert trial.returncode == 0, trial.stderr
    assert any((tmp_path / "machine-cache" / "parsed").iterdir())
    assert trial.stdout.strip().splitlines()[-1].startswith("trial 001 finished: val_acc ")
    assert message.read_text() == trial.stdout.strip().splitlines()[-1]
    stored = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="sweeps/two/trial-001/trial.json")
                        ["Body"].read())
    assert stored["status"] == "finished" and stored["epochs"] == 2
    # its rung read trial 0's status in the bucket, which has none yet
    assert [(r["epoch"], r["trials"], r["decision"]) for r in stored["rungs"]] == [(1, 1, "go on")]
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


# ----------------------------------------------------------------------------------------------
# early stopping: the rule, then ASHA through a preemption, and a pruned trial left alone


def test_the_rules_decide_from_the_records_by_the_documented_rule():
    asha = EarlyStop("asha", "val_acc", min_epochs=1, reduction_factor=3, min_trials=3)
    assert [e for e in range(1, 30) if asha.checks_at(e, epochs=28)] == [1, 3, 9, 27]
    assert not asha.checks_at(9, epochs=9)  # never at a trial's last epoch
    # fewer than min_trials records (its own included): nothing pruned, however bad
    assert asha.decide(1, 0.1, [0.9])["decision"] == "go on"
    # n = 5: the best max(1, 5 // 3) = 1 go on; a tie with it goes on
    assert asha.decide(1, 0.8, [0.9, 0.7, 0.6, 0.5])["decision"] == "pruned"
    assert asha.decide(1, 0.9, [0.9, 0.7, 0.6, 0.5])["decision"] == "go on"
    # n = 6: the best 2 go on; the threshold is the 2nd best
    decided = asha.decide(3, 0.8, [0.9, 0.7, 0.6, 0.5, 0.4])
    assert (decided["decision"], decided["threshold"], decided["trials"]) == ("go on", 0.8, 6)
    assert decided["reason"] == ("val_acc 80.00% is among the best 2 of the 6 trials at epoch 3 "
                                 "(the 2nd best: 80.00%; ASHA keeps 1 in 3)")
    loss = EarlyStop("asha", "val_loss", 1, 2, 2)  # lower is better
    assert loss.decide(1, 0.30, [0.20])["decision"] == "pruned"
    assert loss.decide(1, 0.20, [0.30])["decision"] == "go on"

    median = EarlyStop("median", "val_acc", min_epochs=2, reduction_factor=None, min_trials=3)
    assert [e for e in range(1, 6) if median.checks_at(e, epochs=5)] == [2, 3, 4]
    assert median.decide(2, 0.1, [0.9])["decision"] == "go on"  # 2 records < 3
    alone = EarlyStop("median", "val_acc", 1, None, min_trials=1)
    assert alone.decide(1, 0.1, [])["decision"] == "go on"  # no other trial: no median
    decided = median.decide(2, 0.69, [0.6, 0.7, 0.8])  # the others' median: 0.7
    assert (decided["decision"], decided["threshold"]) == ("pruned", 0.7)
    assert median.decide(2, 0.7, [0.6, 0.7, 0.8])["decision"] == "go on"  # a tie goes on
    assert decided["reason"] == ("val_acc 69.00% is worse than the median 70.00% of the 3 other "
                                 "trials at epoch 2")


ASHA = """\
name: asha
dataset: mnist
checkpoint_uri: {root}
fixed: {{net: fast, epochs: 2, limit_train: 1024, batch_size: 64, checkpoint_every_steps: 1,
        device: cpu, data_uri: {data}}}
grid: {{lr: [0.01, 0.003, 0.00001]}}
early_stop: {{method: asha, metric: val_acc, min_epochs: 1, reduction_factor: 3}}
"""


def trial_files(root: Path, index: int) -> dict[str, int]:
    folder = root / f"trial-{index:03d}"
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def asha(tmp_path_factory, data_dir):
    """Trials 0 and 1 of a 3-trial ASHA sweep (η = 3, a rung at epoch 1 of 2), then trial 2
    (lr 1e-5) uninterrupted in root A, with W&B offline. In root B, which holds A's records of
    trials 0 and 1, trial 2 is stopped by SIGTERM inside epoch 1 (before its rung), then resumed
    by the same command."""
    folder = tmp_path_factory.mktemp("asha")
    files = {}
    for name in ("a", "b"):
        files[name] = write(folder / f"{name}.yaml", ASHA.format(root=folder / name, data=data_dir))
    a, b = folder / "a", folder / "b"
    for index in (0, 1):
        ran = run_cli("sweep", "run", str(files["a"]), "--trial", str(index))
        assert ran.returncode == 0, ran.stdout + ran.stderr
    message = folder / "termination-log"
    message.write_text("")
    wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(folder / "wandb-a"),
                 "WANDB_PROJECT": "cnn-job-tests", "CNN_JOB_TERMINATION_LOG": str(message)}
    uninterrupted = run_cli("sweep", "run", str(files["a"]), "--trial", "2", env=wandb_env)

    for name in ("sweep.json", "trial-000/trial.json", "trial-001/trial.json"):
        (b / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(a / name, b / name)
    stopped = stop_after_first_checkpoint(files["b"], b, 2)
    resumed = run_cli("sweep", "run", str(files["b"]), "--trial", "2")
    return {"a": a, "b": b, "files": files, "folder": folder, "message": message,
            "uninterrupted": uninterrupted, "stopped": stopped, "resumed": resumed}


def test_asha_prunes_the_worst_trial_at_its_rung_with_exit_0(asha):
    ran = asha["uninterrupted"]
    assert ran.returncode == 0, ran.stdout + ran.stderr
    first, second, pruned = (status(asha["a"], index) for index in range(3))
    for trial_status in (first, second):  # the first two: too few records to prune on
        assert trial_status["status"] == "finished" and trial_status["epochs"] == 2
        assert [e["epoch"] for e in trial_status["history"]] == [1, 2]
    assert [(r["trials"], r["decision"]) for r in first["rungs"] + second["rungs"]] == [
        (1, "go on"), (2, "go on")]
    assert pruned["status"] == "pruned" and pruned["epochs"] == 1 and pruned["error"] is None
    (rung,) = pruned["rungs"]
    best_at_1 = max(first["history"][0]["val_acc"], second["history"][0]["val_acc"])
    assert (rung["epoch"], rung["trials"], rung["threshold"], rung["decision"]) == (
        1, 3, best_at_1, "pruned")
    assert rung["value"] == pruned["history"][0]["val_acc"] == pruned["val_acc"]
    assert pruned["pruned"] == {"epoch": 1, "reason": rung["reason"]}
    last = ran.stdout.strip().splitlines()[-1]
    assert last == (f"trial 002 pruned at epoch 1: val_acc {pruned['val_acc']:.2%} is not among "
                    f"the best 1 of the 3 trials at epoch 1 (the best: {best_at_1:.2%}; ASHA "
                    "keeps 1 in 3); its checkpoints are kept")
    assert asha["message"].read_text() == last
    assert (asha["a"] / "trial-002" / "latest").exists()  # its checkpoints stay
    assert "epoch 2/2" not in ran.stdout


def test_asha_stopped_inside_a_rung_then_resumed_decides_as_uninterrupted(asha):
    stopped = asha["stopped"]
    assert stopped["returncode"] == 75, stopped["stderr"]
    assert stopped["status"]["status"] == "stopped" and stopped["status"]["rungs"] == []
    assert stopped["status"]["epochs"] == 0  # inside epoch 1, before its rung
    resumed = asha["resumed"]
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    then, now = status(asha["a"], 2), status(asha["b"], 2)
    assert now["status"] == "pruned"
    assert now["rungs"] == then["rungs"] and now["history"] == then["history"]
    assert resumed.stdout.strip().splitlines()[-1] == asha["uninterrupted"].stdout.strip(
        ).splitlines()[-1]


def test_a_pruned_trial_is_never_run_again(asha):
    a, sweep_file = asha["a"], asha["files"]["a"]
    before, files_before = status(a, 2), trial_files(a, 2)
    # a replacement pod of the Indexed Job, then the trial by number
    for env, args in (({"JOB_COMPLETION_INDEX": "2"}, ()), ({}, ("--trial", "2"))):
        again = run_cli("sweep", "run", str(sweep_file), *args, env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.strip().splitlines() == [asha["uninterrupted"].stdout.strip(
            ).splitlines()[-1]]
    parallel = run_cli("sweep", "run", str(sweep_file), "--parallel", "2")
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    assert " started " not in parallel.stdout
    assert "trial 002 pruned already at epoch 1: skipped" in parallel.stdout
    assert "sweep asha: 2 finished, 1 pruned, of 3;" in parallel.stdout
    assert status(a, 2) == before and trial_files(a, 2) == files_before


def test_the_report_shows_pruned_trials_their_curves_and_history(asha):
    plot = asha["folder"] / "asha.png"
    shown = run_cli("sweep", "report", str(asha["a"]), "--plot", str(plot))
    assert shown.returncode == 0, shown.stderr
    pruned = status(asha["a"], 2)
    (row,) = [line for line in shown.stdout.splitlines() if line.startswith("│   002")]
    assert "pruned at epoch 1" in row and f"{pruned['val_acc']:.2%}" in row
    assert f"pruned: trial 002 at epoch 1: {pruned['pruned']['reason']}" in shown.stdout
    rows = json.loads(run_cli("sweep", "report", str(asha["a"]), "--json").stdout)
    assert [r["status"] for r in rows] == ["finished", "finished", "pruned"]
    assert rows[2]["history"] == pruned["history"] and rows[2]["rungs"] == pruned["rungs"]
    assert rows[2]["pruned"] == pruned["pruned"]
    image = Image.open(plot).convert("RGB")
    assert image.size == (2 * 460, 44 + 340)  # lr, and the learning curves
    # the pruned trial's grey × is drawn in both panels
    grey = [x for x in range(image.size[0]) for y in range(44, image.size[1])
            if image.getpixel((x, y)) == (150, 150, 150)]
    assert min(grey) < 460 < max(grey)


def test_a_trial_carries_its_sweep_to_wandb_and_a_pruned_one_is_tagged(asha):
    (run,) = [OfflineRun(folder) for folder in (asha["folder"] / "wandb-a" / "wandb").glob(
        "offline-run-*")]
    assert run.config["sweep"] == "asha" and run.config["sweep_trial"] == 2
    log = next(run.folder.glob("run-*.wandb"))
    tags = [list(r.run.tags) for r in records(log) if r.WhichOneof("record_type") == "run"]
    assert tags[0] == [] and tags[-1] == ["pruned"], tags


# ----------------------------------------------------------------------------------------------
# --parallel's bookkeeping: another live job, storage out of reach, a signal, its own death

LONG = """\
name: long
dataset: mnist
checkpoint_uri: {root}
fixed: {{net: fast, epochs: 20, limit_train: 2048, batch_size: 32, checkpoint_every_steps: 1,
        device: cpu, data_uri: {data}}}
seeds: {seeds}
"""


def test_parallel_beside_a_live_trial_skips_it_and_leaves_its_status(tmp_path, data_dir):
    root = tmp_path / "root"
    sweep_file = write(tmp_path / "long.yaml", LONG.format(root=root, data=data_dir, seeds="[0]"))
    live = subprocess.Popen([str(CNN_JOB), "sweep", "run", str(sweep_file), "--trial", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("trial 0's first checkpoint", (root / "trial-000" / "latest").exists, live)
        beside = run_cli("sweep", "run", str(sweep_file), "--parallel", "1")
        assert beside.returncode == 75, beside.stdout + beside.stderr
        assert ("trial 000 is being run by a live job elsewhere: its trial.json is left as it "
                "is: skipped") in beside.stdout
        assert "sweep long: 1 running elsewhere, of 1;" in beside.stdout
        assert " started " not in beside.stdout
        live_status = status(root, 0)
        assert live_status["status"] == "running" and live_status["error"] is None
        rows = json.loads(run_cli("sweep", "report", str(root), "--json").stdout)
        assert rows[0]["status"] == "running"
    finally:
        live.send_signal(signal.SIGTERM)
        live.communicate(timeout=WAIT_S)
    assert live.returncode == 75 and status(root, 0)["status"] == "stopped"


def test_a_child_out_of_storage_is_unavailable_and_parallel_exits_69(tmp_path):
    root = tmp_path / "root"
    sweep_file = write(tmp_path / "offline.yaml", f"""\
dataset: mnist
checkpoint_uri: {root}
fixed: {{net: fast, device: cpu, data_uri: "http://127.0.0.1:{free_port()}/data",
        cache_dir: {tmp_path / "cache"}, storage_retry_s: 0}}
seeds: [0]
""")
    result = run_cli("sweep", "run", str(sweep_file), "--parallel", "1")
    assert result.returncode == 69, result.stdout + result.stderr
    recorded = status(root, 0)
    assert recorded["status"] == "unavailable"
    assert recorded["error"] == ("storage out of reach (exit status 69): run the sweep again to "
                                 "resume it")
    assert f"trial 000 unavailable: {recorded['error']}" in result.stdout
    assert "sweep offline: 1 unavailable, of 1;" in result.stdout
    rows = json.loads(run_cli("sweep", "report", str(root), "--json").stdout)
    assert rows[0]["status"] == "unavailable"


def test_parallel_retries_storage_for_the_files_budget_only(tmp_path):
    sweep_file = write(tmp_path / "s3.yaml", f"""\
dataset: mnist
checkpoint_uri: s3://bucket/sweeps/s3
fixed: {{device: cpu, s3_endpoint_url: "http://127.0.0.1:{free_port()}", storage_retry_s: 1}}
seeds: [0]
""")
    env = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for args in (("--parallel", "1"), ("--trial", "0")):
        # the default budget (300 s) would outlast the timeout
        result = run_cli("sweep", "run", str(sweep_file), *args, env=env, timeout=90)
        assert result.returncode == 69, result.stdout + result.stderr
        assert result.stderr.count("\n") == 1 and "s3://bucket/sweeps/s3/sweep.json" in result.stderr


def test_parallel_forwards_sigterm_to_its_trials_and_starts_no_more(tmp_path, data_dir):
    root = tmp_path / "root"
    sweep_file = write(tmp_path / "long.yaml",
                       LONG.format(root=root, data=data_dir, seeds="[0, 1, 2]"))
    parent = subprocess.Popen([str(CNN_JOB), "sweep", "run", str(sweep_file), "--parallel", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for index in (0, 1):
        wait_for(f"trial {index}'s first checkpoint",
                 (root / f"trial-{index:03d}" / "latest").exists, parent)
    parent.send_signal(signal.SIGTERM)  # to the parent only: each child has a session of its own
    out, err = parent.communicate(timeout=WAIT_S)
    assert parent.returncode == 75, out + err
    assert "SIGTERM: stopping the running trials, starting no more" in out
    for index in (0, 1):
        assert status(root, index)["status"] == "stopped"
        assert f"trial {index:03d} stopped at epoch 0, step " in out
    assert not (root / "trial-002").exists() and " 002 started" not in out
    assert "sweep long: 2 stopped, 1 not run, of 3;" in out


def test_the_trial_of_a_killed_parallel_stops_as_preempted(tmp_path, data_dir):
    root = tmp_path / "root"
    sweep_file = write(tmp_path / "long.yaml", LONG.format(root=root, data=data_dir, seeds="[0]"))
    parent = subprocess.Popen([str(CNN_JOB), "sweep", "run", str(sweep_file), "--parallel", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for("the trial's first checkpoint", (root / "trial-000" / "latest").exists, parent)
    holder = (root / "trial-000" / ".holder").read_text()  # "HOST pid PID since ..."
    child = int(holder.split(" pid ")[1].split()[0])
    parent.kill()
    parent.communicate(timeout=WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while alive(child):
        assert time.monotonic() < deadline, "the trial trained on after its parent died"
        time.sleep(0.05)
    recorded = status(root, 0)
    assert recorded["status"] == "stopped" and recorded["error"] is None
    assert recorded["epochs"] < 20


# ----------------------------------------------------------------------------------------------
# the pod's settings: CNN_JOB_* variables of where and how a trial runs apply, those that would
# change its result are refused; the commands the job prints run as printed

NO_DATA_URI = """\
name: pod
dataset: mnist
checkpoint_uri: {root}
fixed: {{net: fast, epochs: 1, limit_train: 640, batch_size: 64, lr: 0.01, device: cpu}}
"""


def test_a_trial_takes_the_pods_data_and_checkpoint_cadence(tmp_path, data_dir):
    """A file without data_uri, as k8s/sweep/'s, run where the settings ConfigMap sets
    CNN_JOB_DATA_URI and CNN_JOB_CHECKPOINT_EVERY_STEPS: the trial reads that copy of the data
    (the public mirrors are out of reach here) and checkpoints at that cadence; CNN_JOB_LR with
    the file's own value is accepted."""
    copy = tmp_path / "data-copy"
    shutil.copytree(data_dir / "mnist", copy / "mnist")
    root = tmp_path / "root"
    sweep_file = write(tmp_path / "pod.yaml", NO_DATA_URI.format(root=root))
    env = {"CNN_JOB_DATA_URI": str(copy), "CNN_JOB_CHECKPOINT_EVERY_STEPS": "3",
           "CNN_JOB_KEEP_CHECKPOINTS": "10", "CNN_JOB_LR": "0.01",
           "CNN_JOB_CACHE_DIR": str(tmp_path / "cache")}
    shown = run_cli("sweep", "plan", str(sweep_file), "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["environment"] == {
        "CNN_JOB_DATA_URI": str(copy), "CNN_JOB_CACHE_DIR": str(tmp_path / "cache"),
        "CNN_JOB_CHECKPOINT_EVERY_STEPS": 3, "CNN_JOB_KEEP_CHECKPOINTS": 10}

    trial = run_cli("sweep", "run", str(sweep_file), "--trial", "0", env=env)
    assert trial.returncode == 0, trial.stdout + trial.stderr
    # 10 steps: a checkpoint every 3, and the epoch's end
    assert sorted(path.name for path in (root / "trial-000").glob("step-*.pt")) == [
        f"step-{step:09d}.pt" for step in (3, 6, 9, 10)]
    from job.checkpoint import load_checkpoint

    config = load_checkpoint(str(root / "trial-000"), None, print).state["config"]
    assert config["data_uri"] == str(copy) and config["checkpoint_every_steps"] == 3
    assert config["lr"] == 0.01
    sources = status(root, 0)["sources"]
    assert sources["fixed"]["limit_train"] == 640 and sources["grid"] == {}
    assert sources["environment"] == {
        "CNN_JOB_DATA_URI": str(copy), "CNN_JOB_CACHE_DIR": str(tmp_path / "cache"),
        "CNN_JOB_CHECKPOINT_EVERY_STEPS": 3, "CNN_JOB_KEEP_CHECKPOINTS": 10}
    assert any((tmp_path / "cache" / "parsed").iterdir())


@pytest.mark.parametrize(("env", "message"), [
    ({"CNN_JOB_LR": "0.5"}, "CNN_JOB_LR=0.5 differs from the lr that {file} gives its trials "
     "(0.01): a trial's result comes from its sweep file; unset CNN_JOB_LR"),
    ({"CNN_JOB_SEED": "3"}, "CNN_JOB_SEED=3 would change the trials' results, which come from the "
     "sweep file alone: put seed: 3 in the fixed settings of {file}, or unset CNN_JOB_SEED"),
    ({"CNN_JOB_DEVICE": "cuda"}, "CNN_JOB_DEVICE=cuda differs from the device that"),
    ({"CNN_JOB_CHECKPOINT_URI": "runs/x"}, "CNN_JOB_CHECKPOINT_URI=runs/x: a sweep gives each "
     "trial its own checkpoint_uri ({root}/trial-000); unset CNN_JOB_CHECKPOINT_URI"),
    ({"CNN_JOB_DATASET": "cifar10"}, "CNN_JOB_DATASET=cifar10: a sweep gives each trial its own "
     "dataset (mnist)"),
    ({"CNN_JOB_RESUME": "never"}, "CNN_JOB_RESUME=never: a sweep gives each trial its own resume"),
    ({"CNN_JOB_CHECKPOINT_EVERY_STEPS": "often"}, "CNN_JOB_CHECKPOINT_EVERY_STEPS"),
], ids=["other-value", "not-in-the-file", "device", "checkpoint-uri", "dataset", "resume",
        "not-a-number"])
def test_a_result_changing_variable_is_refused_in_one_line(tmp_path, env, message):
    root = tmp_path / "root"
    sweep_file = write(tmp_path / "pod.yaml", NO_DATA_URI.format(root=root))
    message = message.format(file=sweep_file, root=root)
    for command in (("plan",), ("run", "--trial", "0"), ("run", "--parallel", "1")):
        result = run_cli("sweep", command[0], str(sweep_file), *command[1:], env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not root.exists()


def test_a_variable_with_the_sweeps_own_value_is_accepted(tmp_path):
    sweep_file = write(tmp_path / "pod.yaml", NO_DATA_URI.format(root=tmp_path / "root"))
    accepted = {"CNN_JOB_DATASET": "mnist", "CNN_JOB_RESUME": "auto", "CNN_JOB_OVERWRITE": "false",
                "CNN_JOB_LR": "0.01", "CNN_JOB_DEVICE": "cpu", "CNN_JOB_NET": "fast"}
    shown = run_cli("sweep", "plan", str(sweep_file), "--json", env=accepted)
    assert shown.returncode == 0, shown.stderr
    # none of them is a `where` setting a trial takes (`make test` itself sets CNN_JOB_DATA_URI)
    assert not set(json.loads(shown.stdout)["environment"]) & set(accepted)


def test_the_printed_commands_run_as_printed(s3, tmp_path, data_dir, monkeypatch):
    """train's `next:`, a sweep's `cnn-job sweep report ...` and the report's `next: cnn-job
    evaluate ...`, each run as printed where the only endpoint is the one the job printed (the
    file's or the option's: AWS_ENDPOINT_URL unset)."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    shell = {"PATH": f"{CNN_JOB.parent}{os.pathsep}{os.environ['PATH']}",
             "CNN_JOB_CACHE_DIR": str(tmp_path / "cache")}

    def run_printed(output: str, prefix: str) -> str:
        (line,) = [line for line in output.splitlines() if prefix in line]
        command = shlex.split(line.split(prefix, 1)[1])
        assert command[0] == "cnn-job" and "--s3-endpoint-url" in command, line
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env={**os.environ, **shell})
        assert result.returncode == 0, f"{line}\n{result.stderr}"
        return result.stdout

    # train: the data in the bucket, the checkpoints in a folder; evaluate reads the run's data
    data = f"s3://{s3.bucket}/datasets"
    assert run_cli("data", "push", "mnist", data, "--from", str(data_dir), "--s3-endpoint-url",
                   s3.endpoint).returncode == 0
    train = run_cli("train", "mnist", "--net", "fast", "--epochs", "1", "--limit-train", "256",
                    "--device", "cpu", "--data-uri", data, "--checkpoint-uri",
                    str(tmp_path / "run"), "--s3-endpoint-url", s3.endpoint, env=shell)
    assert train.returncode == 0, train.stderr
    assert train.stdout.splitlines()[-1] == (f"next: cnn-job evaluate {tmp_path / 'run'} "
                                             f"--s3-endpoint-url {s3.endpoint}")
    assert "accuracy" in run_printed(train.stdout, "next: ").lower()

    # a sweep in the bucket, its endpoint in the file: the trial's next:, the report, evaluate
    root = f"s3://{s3.bucket}/sweeps/printed"
    sweep_file = write(tmp_path / "printed.yaml", f"""\
dataset: mnist
checkpoint_uri: {root}
fixed: {{net: fast, epochs: 1, limit_train: 256, device: cpu, data_uri: {data_dir},
        s3_endpoint_url: "{s3.endpoint}"}}
""")
    sweep = run_cli("sweep", "run", str(sweep_file), "--parallel", "1", env=shell)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert f"trial 000 | next: cnn-job evaluate {root}/trial-000 --s3-endpoint-url " in sweep.stdout
    run_printed(sweep.stdout, "trial 000 | next: ")
    assert sweep.stdout.splitlines()[-1] == (f"sweep printed: 1 finished, of 1; cnn-job sweep "
                                             f"report {root} --s3-endpoint-url {s3.endpoint}")
    report = run_printed(sweep.stdout, "of 1; ")
    assert "best: trial 000" in report
    assert "accuracy" in run_printed(report, "next: ").lower()


def test_the_shipped_sweep_files_plan_and_the_readme_names_one():
    repo = Path(__file__).resolve().parent.parent
    examples = sorted((repo / "examples").glob("*.yaml"))
    assert "examples/mnist-lr.yaml" in (repo / "README.md").read_text()
    assert repo / "examples" / "mnist-lr.yaml" in examples
    for example in examples:
        shown = run_cli("sweep", "plan", str(example.relative_to(repo)), cwd=repo)
        assert shown.returncode == 0, shown.stderr
        assert f"root: runs/sweeps/{example.stem} " in shown.stdout
