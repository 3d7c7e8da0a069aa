"""The command line: options reach the training function; bad input is one line, exit 2."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import job.cli
from job import recipes
from job.cli import app
from job.config import TrainConfig, default_checkpoint_uri
from job.errors import JobError
from tests.conftest import run_cli

runner = CliRunner()


@pytest.fixture
def received(monkeypatch):
    """What reached run_training (the CLI's only hand-off), instead of a real run."""
    configs = []
    monkeypatch.setattr(job.cli, "run_training", configs.append)
    return configs


def test_help_explains_every_option():
    result = runner.invoke(app, ["train", "--help"], env={"TERMINAL_WIDTH": "400", "COLUMNS": "400"})
    assert result.exit_code == 0
    for option in ("--epochs", "--batch-size", "--lr", "--seed", "--device", "--precision", "--lr-schedule",
                   "--data-uri", "--cache-dir", "--checkpoint-uri", "--resume",
                   "--keep-checkpoints", "--limit-train", "--augment", "--no-augment",
                   "--eval-batch-size", "--summary-json"):
        assert option in result.output, option
        envvar = "CNN_JOB_" + option[2:].replace("-", "_").upper()
        if option != "--no-augment":
            assert envvar in result.output, envvar
    root = runner.invoke(app, ["--help"])
    assert root.exit_code == 0 and "train" in root.output


def test_help_is_written_once_in_the_config():
    """Each option's help is its TrainConfig field's metadata, shown as is and not retyped in cli.py."""
    result = runner.invoke(app, ["train", "--help"], env={"TERMINAL_WIDTH": "400", "COLUMNS": "400"})
    assert result.exit_code == 0
    cli_source = Path(job.cli.__file__).read_text()
    shown = " ".join(result.output.replace("│", " ").split())  # as read, wherever rich wraps it
    for field in dataclasses.fields(TrainConfig):
        if field.name == "dataset":
            continue
        help_text = field.metadata.get("help")
        assert help_text and "\n" not in help_text, field.name
        assert " ".join(help_text.split()) in shown, field.name
        assert "CNN_JOB_" + field.name.upper() in result.output, field.name
        assert help_text not in cli_source, f"{field.name}'s help is written in cli.py too"


@pytest.mark.parametrize("xdg_cache", [False, True])
def test_help_shows_the_defaults_the_code_computes(tmp_path, xdg_cache):
    env = {"COLUMNS": "400", "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": ""}
    if xdg_cache:
        env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    result = run_cli("train", "--help", env=env)
    assert result.returncode == 0, result.stderr
    cache_dir = str(tmp_path / "xdg" / "cnn-job") if xdg_cache else "~/.cache/cnn-job"
    assert f"[default: ({cache_dir})]" in result.stdout
    assert f"[default: ({default_checkpoint_uri('<dataset>')})]" in result.stdout
    assert "[default: (runs/<dataset>/checkpoints)]" in result.stdout


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter and check it did not import torch (seconds, at start)."""
    check = f"import sys; {code}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_help_does_not_load_torch():
    run_without_torch("from typer.testing import CliRunner; from job.cli import app; "
                      "assert CliRunner().invoke(app, ['train', '--help']).exit_code == 0")


def test_options_reach_the_config(received, tmp_path):
    result = runner.invoke(app, [
        "train", "cifar10", "--epochs", "2", "--batch-size", "128", "--lr", "0.01", "--seed", "3",
        "--device", "cpu", "--data-uri", str(tmp_path), "--checkpoint-uri", str(tmp_path / "c"),
        "--resume", "never", "--limit-train", "500", "--augment", "--summary-json",
        str(tmp_path / "s.json"),
    ])
    assert result.exit_code == 0, result.output
    (cfg,) = received
    assert cfg == TrainConfig(
        dataset="cifar10", epochs=2, batch_size=128, lr=0.01, seed=3, device="cpu",
        data_uri=str(tmp_path), checkpoint_uri=str(tmp_path / "c"), resume="never",
        limit_train=500, augment=True, summary_json=tmp_path / "s.json",
    )


def test_defaults_are_the_seeds(received):
    assert runner.invoke(app, ["train", "cifar10"]).exit_code == 0
    (cfg,) = received
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.augment) == (5, 64, 1e-3, False)
    assert cfg.lr_schedule == "linear"
    assert cfg.checkpoint_uri == "runs/cifar10/checkpoints"


def _defaults(dataset: str, net: str) -> dict:
    """TrainConfig's value of every setting when none is given."""
    return dataclasses.asdict(TrainConfig(dataset=dataset, net=net))


def test_every_option_reads_its_environment_variable(received, tmp_path):
    env = {
        "CNN_JOB_DATASET": "mnist", "CNN_JOB_EPOCHS": "7", "CNN_JOB_BATCH_SIZE": "32",
        "CNN_JOB_LR": "0.002", "CNN_JOB_LR_SCHEDULE": "cosine", "CNN_JOB_SEED": "9", "CNN_JOB_DEVICE": "cpu",
        "CNN_JOB_PRECISION": "bf16", "CNN_JOB_DATA_URI": "/data", "CNN_JOB_CACHE_DIR": "/cache",
        "CNN_JOB_CHECKPOINT_URI": "/ckpt", "CNN_JOB_RESUME": "never",
        "CNN_JOB_KEEP_CHECKPOINTS": "5", "CNN_JOB_LIMIT_TRAIN": "100",
        "CNN_JOB_EVAL_BATCH_SIZE": "250", "CNN_JOB_SUMMARY_JSON": str(tmp_path / "s.json"),
        "CNN_JOB_NET": "fast", "CNN_JOB_TTA": "true", "CNN_JOB_COMPILE": "off",
        "CNN_JOB_S3_ENDPOINT_URL": "http://127.0.0.1:9000", "CNN_JOB_CHECKPOINT_EVERY_STEPS": "20",
        "CNN_JOB_OVERWRITE": "true", "CNN_JOB_LEASE_SECONDS": "45", "CNN_JOB_STORAGE_RETRY_S": "7",
        "CNN_JOB_COLLECTIVE_TIMEOUT_S": "60", "CNN_JOB_LOG_EVERY_STEPS": "3",
        "CNN_JOB_WANDB_PROJECT": "p", "CNN_JOB_WANDB_MODE": "offline", "CNN_JOB_RUN_NAME": "r",
    }
    assert runner.invoke(app, ["train"], env=env).exit_code == 0
    (cfg,) = received
    assert cfg == TrainConfig(
        dataset="mnist", epochs=7, batch_size=32, lr=0.002, lr_schedule="cosine", seed=9,
        device="cpu",
        precision="bf16", data_uri="/data", cache_dir="/cache", checkpoint_uri="/ckpt",
        resume="never", keep_checkpoints=5, limit_train=100, eval_batch_size=250,
        summary_json=tmp_path / "s.json", net="fast", tta=True, compile="off",
        s3_endpoint_url="http://127.0.0.1:9000", checkpoint_every_steps=20, overwrite=True,
        lease_seconds=45, storage_retry_s=7, collective_timeout_s=60, log_every_steps=3,
        wandb_project="p", wandb_mode="offline", run_name="r",
    )
    runner.invoke(app, ["train", "cifar10"], env={"CNN_JOB_AUGMENT": "true"})
    assert received[-1].augment is True
    # every setting, each handed on by name: none left out between the option and TrainConfig
    fields = {"CNN_JOB_" + field.name.upper() for field in dataclasses.fields(TrainConfig)}
    assert fields == {*env, "CNN_JOB_AUGMENT"}
    assert all(getattr(cfg, name) != value for name, value in _defaults("cifar10", "seed").items()
               if name not in ("augment", "cache_dir"))


# ----------------------------------------------------------------------------------------------
# bad input, through the real console script: exit 2, one line, nothing left behind


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_dataset(tmp_path):
    result = run_cli("train", "imagenet", "--checkpoint-uri", str(tmp_path / "c"))
    assert_one_line_error(result, "'imagenet' is not one of 'mnist', 'cifar10'")
    assert not (tmp_path / "c").exists()


def test_bad_option_value_is_one_line_too():
    assert_one_line_error(run_cli("train", "mnist", "--epochs", "many"), "--epochs")
    assert_one_line_error(run_cli("train", "mnist", "--epochs", "0"), "--epochs must be at least 1")


@pytest.mark.parametrize("option, value, choices", [
    ("--device", "tpu", "'auto', 'cpu', 'cuda'"),
    ("--precision", "fp8", "'auto', 'fp32', 'bf16'"),
    ("--compile", "max", "'auto', 'off', 'cuda-graph'"),
    ("--lr-schedule", "step", "'constant', 'linear', 'cosine', 'triangle'"),
    ("--resume", "always", "'auto', 'never'"),
    ("--wandb-mode", "on", "'online', 'offline', 'disabled'"),
    ("--net", "turbo", ", ".join(map(repr, recipes.NETS))),
])
def test_a_choice_is_listed_in_help_and_checked_once_from_the_option_or_its_variable(
        option, value, choices, tmp_path):
    """The values come from the option's type: --help lists them, and a bad one is one line,
    exit 2, given on the command line or in CNN_JOB_*; TrainConfig refuses it built otherwise."""
    listed = runner.invoke(app, ["train", "--help"], env={"TERMINAL_WIDTH": "400", "COLUMNS": "400"})
    assert "<" + "|".join(re.findall(r"'([^']+)'", choices)) + ">" in listed.output
    variable = "CNN_JOB_" + option[2:].replace("-", "_").upper()
    for result in (run_cli("train", "mnist", option, value, cwd=tmp_path),
                   run_cli("train", "mnist", env={variable: value}, cwd=tmp_path)):
        assert_one_line_error(result, f"Invalid value for '{option}' (env var: '{variable}')",
                              f"{value!r} is not one of {choices}")
    assert list(tmp_path.iterdir()) == []
    refused = ("--net turbo has no recipe for mnist" if option == "--net"  # the registry's line
               else f"{option} {value} is not one of ")
    with pytest.raises(JobError, match=f"^{re.escape(refused)}"):
        TrainConfig(dataset="mnist", **{option[2:].replace("-", "_"): value})


def test_data_folder_without_archives(tmp_path):
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    result = run_cli("train", "mnist", "--data-uri", str(tmp_path / "data"),
                     "--checkpoint-uri", str(tmp_path / "c"), "--summary-json",
                     str(tmp_path / "s.json"))
    assert_one_line_error(result, "no mnist/train-images-idx3-ubyte.gz there", "--data-uri")
    assert list((tmp_path / "c").iterdir()) == [] and not (tmp_path / "s.json").exists()


def test_corrupt_archive(tmp_path, data_dir):
    data = tmp_path / "data"
    shutil.copytree(data_dir / "mnist", data / "mnist")
    images = data / "mnist" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100_000])
    result = run_cli("train", "mnist", "--data-uri", str(data), "--checkpoint-uri",
                     str(tmp_path / "c"), "--summary-json", str(tmp_path / "s.json"))
    assert_one_line_error(result, "train-images-idx3-ubyte.gz is corrupt or truncated")
    assert list((tmp_path / "c").iterdir()) == [] and not (tmp_path / "s.json").exists()


def test_a_mirror_that_does_not_answer_is_unavailable_not_bad_input(tmp_path):
    # Waited for as long as --storage-retry-s says (0 here), then exit 69: retried, not failed.
    result = run_cli("train", "mnist", "--data-uri", "http://127.0.0.1:9", "--checkpoint-uri",
                     str(tmp_path / "c"), "--cache-dir", str(tmp_path), "--storage-retry-s", "0")
    assert result.returncode == 69 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        "error: HTTP mirror http://127.0.0.1:9 unreachable for 0 s (Connection refused) at "
        "http://127.0.0.1:9/SHA256SUMS; the checkpoints are intact: run the same command to resume "
        "once it answers (exit status 69)"]


def test_checkpoint_folder_under_a_file(tmp_path, data_dir):
    (tmp_path / "file").write_text("not a folder")
    result = run_cli("train", "mnist", "--data-uri", str(data_dir),
                     "--checkpoint-uri", str(tmp_path / "file" / "ckpt"))
    assert_one_line_error(result, "checkpoint folder", "is not writable", "--checkpoint-uri")


def test_checkpoint_folder_without_write_permission(tmp_path, data_dir):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    folder.chmod(0o555)
    # root writes anywhere; without CAP_DAC_OVERRIDE it is held to the folder's mode like anyone.
    as_plain_user = ["setpriv", "--bounding-set=-dac_override"] if os.geteuid() == 0 else []
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--checkpoint-uri",
                     str(folder), "--cache-dir", str(tmp_path / "cache"), prefix=as_plain_user)
    assert_one_line_error(result, f"checkpoint folder {folder} is not writable", "Permission denied")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("env, option, fragments", [
    ({"CNN_JOB_RECORD_INDICES": "/nonexistent/dir/x"}, [],
     ["CNN_JOB_RECORD_INDICES /nonexistent/dir/x.rank0: there is no folder /nonexistent/dir"]),
    ({"CNN_JOB_RECORD_INDICES": "/proc/version"}, [],
     ["output folder /proc is not writable", "CNN_JOB_RECORD_INDICES"]),
    ({}, ["--summary-json", "{tmp}/missing/s.json"], ["--summary-json", "there is no folder {tmp}/missing"]),
    ({}, ["--cache-dir", "/proc/cache"], ["cache folder /proc/cache is not writable", "--cache-dir"]),
    ({"XDG_CACHE_HOME": "/proc/x"}, [], ["cache folder /proc/x/cnn-job is not writable"]),
    ({"WORLD_SIZE": "two"}, [], ["WORLD_SIZE='two' is not a process count", "unset it"]),
])
def test_environment_and_output_paths_are_checked_before_any_work(env, option, fragments, tmp_path,
                                                                  data_dir):
    """One line, exit 2, and nothing left behind: not even the checkpoint folder."""
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--checkpoint-uri",
                     str(tmp_path / "c"), "--limit-train", "64", "--epochs", "1",
                     *(arg.format(tmp=tmp_path) for arg in option), env=env)
    assert_one_line_error(result, *(fragment.format(tmp=tmp_path) for fragment in fragments))
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, env, fragments", [
    (["--seed", "99999999999999999999"], {}, ["--seed 99999999999999999999 does not fit in 64 bits"]),
    (["--seed", str(-(2**63) - 1)], {}, ["does not fit in 64 bits", str(-(2**63))]),
    (["--data-uri", "http://"], {}, ["--data-uri http:// names no host"]),
    (["--data-uri", "https:///mnist"], {}, ["names no host", "http(s)://HOST/PATH"]),
    (["--checkpoint-uri", ""], {}, ["--checkpoint-uri is empty", "leave it out for its default"]),
    (["--cache-dir", ""], {}, ["--cache-dir", "is empty"]),
    ([], {"CNN_JOB_CHECKPOINT_URI": " "}, ["--checkpoint-uri is empty"]),
    ([], {"WORLD_SIZE": "2", "RANK": "5"}, ["RANK=5 is not below WORLD_SIZE=2"]),
    ([], {"WORLD_SIZE": "2", "RANK": "1"}, ["WORLD_SIZE=2 but MASTER_ADDR is not set", "torchrun"]),
], ids=["seed-over-64-bits", "seed-under-64-bits", "http-no-host", "https-no-host",
        "empty-checkpoint-uri", "empty-cache-dir", "blank-checkpoint-uri-env", "rank-past-world",
        "no-master-addr"])
def test_values_that_once_raised_or_meant_the_working_folder(args, env, fragments, tmp_path,
                                                             monkeypatch):
    """One line, exit 2, and nothing written in the working folder."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    result = run_cli("train", "mnist", "--device", "cpu", "--limit-train", "64", "--epochs", "1",
                     *args, env=env, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_seed_past_64_bits_is_one_line(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("dataset: mnist\nseeds: [0, 99999999999999999999]\n")
    assert_one_line_error(run_cli("sweep", "plan", str(sweep)),
                          "trial 1 (seed 99999999999999999999)", "does not fit in 64 bits")


@pytest.mark.parametrize("command, variable, value", [
    (["train", "mnist"], "CNN_JOB_PROGRESS_INTERVAL_S", "soon"),
    (["train", "mnist"], "WANDB_INIT_TIMEOUT", "-1"),
    (["train", "mnist"], "CNN_JOB_TRAINER_STATUS_INTERVAL_S", "often"),
    (["train", "mnist"], "CNN_JOB_TRAINER_STATUS_TIMEOUT_S", "-5"),
    (["checkpoints", "list", "s3://bucket/runs"], "CNN_JOB_STORAGE_RETRY_S", "nan"),
    (["launch", "train", "mnist"], "CNN_JOB_RDZV_TIMEOUT_S", "inf"),
])
def test_a_bad_number_of_seconds_in_the_environment_is_one_line(command, variable, value,
                                                                 tmp_path):
    """Every seconds variable by one rule: a finite number, 0 or more; refused before any work."""
    result = run_cli(*command, env={variable: value}, cwd=tmp_path)
    assert_one_line_error(result, f"{variable}={value!r} is not a number of seconds: it takes a "
                          "finite number, 0 or more")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, fragment", [
    (["evaluate", "{tmp}/run", "--device", "tpu"], "'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    (["predict", "{tmp}/run", "{tmp}/x.png", "--device", "tpu"],
     "'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    (["evaluate", "{tmp}/run", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["evaluate", "{tmp}/run", "--precision", "fp8"], "'fp8' is not one of 'auto', 'fp32', 'bf16'"),
    (["evaluate", "{tmp}/run", "--cache-dir", ""], "is empty"),
])
def test_after_training_commands_check_their_options_as_train_does(args, fragment, tmp_path):
    """Before anything is read: the checkpoint named here does not even exist."""
    assert_one_line_error(run_cli(*(arg.format(tmp=tmp_path) for arg in args)), fragment)


def test_piped_checkpoint_list_keeps_whole_names_and_the_latest_marker(tmp_path):
    from job.checkpoint import CheckpointManager

    manager = CheckpointManager(str(tmp_path / "run"), keep=5)
    for step in (100, 200):
        manager.save({"model": {}, "optimizer": {}, "config": {"dataset": "mnist"}, "rng": {},
                      "epoch": step // 100, "step": step, "epoch_step": 0,
                      "metrics": [{"step": step, "val_acc": 0.5}]}, step)
    (tmp_path / "run" / "step-000000300.pt").write_bytes(b"torn write of a checkpoint that died")
    result = run_cli("checkpoints", "list", str(tmp_path / "run"), env={"COLUMNS": ""})  # | cat
    assert result.returncode == 0, result.stderr
    rows = {re.search(r"step-\d+\.pt", line)[0]: line for line in result.stdout.splitlines()
            if "step-0" in line}
    assert set(rows) == {"step-000000100.pt", "step-000000200.pt", "step-000000300.pt"}, result.stdout
    assert "*" in rows["step-000000200.pt"] and "*" not in rows["step-000000100.pt"]
    assert "unreadable: not a loadable torch file" in rows["step-000000300.pt"]
    assert "…" not in result.stdout


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_listing_a_path_that_is_no_checkpoint_folder_is_one_line_and_exit_2(tmp_path, where):
    path = tmp_path / "run"
    if where == "a file":
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")  # as /etc/passwd would be
    result = run_cli("checkpoints", "list", str(path))
    what = "is a file" if where == "a file" else "does not exist"
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: {path} {what}: pass the checkpoint folder a run writes "
                             "(--checkpoint-uri), or an s3:// prefix\n")


def test_after_training_commands_answer_help_without_loading_torch():
    run_without_torch("from typer.testing import CliRunner; from job.cli import app; "
                      "assert all(CliRunner().invoke(app, [c, '--help']).exit_code == 0 "
                      "for c in ('evaluate', 'predict', 'export'))")
