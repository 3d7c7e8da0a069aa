"""S3-compatible storage against a real server process on loopback, through boto3."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from job.config import TrainConfig
from job.data import fetch_archives
from job.datasets import preset
from job.errors import JobError
from job.storage import (
    LocalStore,
    Output,
    S3Store,
    open_object,
    open_store,
    parse_s3_uri,
    read_object,
    uri_kind,
)
from job.train import train
from tests.conftest import CNN_JOB, SECRET, archive_sha256, run_cli, start_s3_server


def push_mnist(s3, data_dir, prefix="datasets"):
    result = run_cli("data", "push", "mnist", f"s3://{s3.bucket}/{prefix}", "--from", str(data_dir))
    assert result.returncode == 0, result.stderr
    return f"s3://{s3.bucket}/{prefix}"


def test_parse_s3_uri():
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(JobError, match="write it as s3://BUCKET/PREFIX"):
        parse_s3_uri("s3:///nobucket")


def test_one_dispatcher_for_data_and_checkpoint_uris(s3, tmp_path):
    assert [uri_kind(u, "--data-uri") for u in (str(tmp_path), "runs/a", f"file://{tmp_path}")] == [
        "local"] * 3
    assert uri_kind("s3://bucket/p", "--data-uri") == "s3"
    assert [uri_kind(u, "--data-uri") for u in ("http://mirror/d", "https://mirror/d")] == ["http"] * 2
    assert isinstance(open_store(f"file://{tmp_path}/c"), LocalStore)
    assert open_store(f"file://{tmp_path}/c").uri == f"{tmp_path}/c"
    store = open_store(f"s3://{s3.bucket}/runs")
    assert isinstance(store, S3Store) and (store.bucket, store.prefix) == (s3.bucket, "runs")
    with pytest.raises(JobError, match=r"^--checkpoint-uri https://h/c: https:// is not supported; "
                                       r"use a folder or s3://$"):
        open_store("https://h/c")


def test_one_file_by_uri_is_a_store_and_a_name(s3, tmp_path):
    store, name = open_object(f"file://{tmp_path}/a/b.pt", "CHECKPOINT")
    assert isinstance(store, LocalStore) and (store.folder, name) == (tmp_path / "a", "b.pt")
    store, name = open_object(f"s3://{s3.bucket}/a/b.pt", "CHECKPOINT")
    assert isinstance(store, S3Store) and (store.bucket, store.prefix, name) == (s3.bucket, "a", "b.pt")
    assert open_object(f"s3://{s3.bucket}/b.pt", "IMAGE")[0].prefix == ""
    for bucket_only in (f"s3://{s3.bucket}", f"s3://{s3.bucket}/"):
        with pytest.raises(JobError, match=r"names no object; write it as s3://BUCKET/KEY$"):
            open_object(bucket_only, "IMAGE")
    with pytest.raises(JobError, match=r"^IMAGE https://h/x.png: https:// is not supported; "
                                       r"use a folder or s3://$"):
        open_object("https://h/x.png", "IMAGE")


def test_read_object_and_its_one_line_errors(s3, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"local")
    s3.client.put_object(Bucket=s3.bucket, Key="p/x.bin", Body=b"remote")
    assert read_object(str(tmp_path / "x.bin"), "IMAGE") == b"local"
    assert read_object(f"s3://{s3.bucket}/p/x.bin", "IMAGE") == b"remote"
    for uri, message in ((str(tmp_path / "none.bin"), f"cannot read {tmp_path / 'none.bin'} "
                                                      "(No such file or directory)"),
                         (str(tmp_path), f"{tmp_path} is a folder, not a file"),
                         (f"s3://{s3.bucket}/p/none.bin",
                          f"s3://{s3.bucket}/p/none.bin does not exist in S3; check the URI")):
        with pytest.raises(JobError) as error:
            read_object(uri, "IMAGE")
        assert str(error.value) == message


def test_an_output_is_checked_before_the_work_and_written_whole(s3, tmp_path):
    local = Output(str(tmp_path / "r.json"), "--json")
    local.check()
    assert local.write(b"{}") == str(tmp_path / "r.json")
    assert (tmp_path / "r.json").read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left
    nowhere = tmp_path / "new" / "r.json"
    with pytest.raises(JobError, match=re.escape(f"--json {nowhere}: there is no folder")):
        Output(str(nowhere), "--json").check()
    with pytest.raises(JobError, match=re.escape(f"--json {tmp_path} is not a regular file")):
        Output(str(tmp_path), "--json").check()
    remote = Output(f"s3://{s3.bucket}/out/r.json", "--output")
    remote.check()
    assert remote.write(b"[]") == f"s3://{s3.bucket}/out/r.json"
    assert s3.client.get_object(Bucket=s3.bucket, Key="out/r.json")["Body"].read() == b"[]"
    with pytest.raises(JobError, match=r"bucket no-such-bucket of s3://no-such-bucket/r\.json does not"):
        Output("s3://no-such-bucket/r.json", "--output").check()


def test_unsupported_scheme_is_the_same_one_line_for_data_and_checkpoints(data_dir, tmp_path):
    checkpoint = one_line_error(run_cli("train", "mnist", "--checkpoint-uri", "ftp://host/c"))
    data = one_line_error(run_cli("train", "mnist", "--data-uri", "ftp://host/d", "--checkpoint-uri",
                                  str(tmp_path / "c"), "--cache-dir", str(tmp_path)))
    assert checkpoint == "error: --checkpoint-uri ftp://host/c: ftp:// is not supported; use a folder or s3://"
    assert data == "error: --data-uri ftp://host/d: ftp:// is not supported; use a folder, s3:// or http(s)://"
    with pytest.raises(JobError) as in_process:
        fetch_archives(preset("mnist"), "ftp://host/d", tmp_path)
    assert f"error: {in_process.value}" == data


def test_push_then_pull_reuses_the_cache_until_the_object_changes(s3, data_dir, tmp_path):
    uri = push_mnist(s3, data_dir)
    keys = sorted(o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket)["Contents"])
    assert keys == sorted(f"datasets/mnist/{a.name}" for a in preset("mnist").archives)
    paths = fetch_archives(preset("mnist"), uri, tmp_path)
    for name, path in paths.items():
        assert path.read_bytes() == (data_dir / "mnist" / name).read_bytes()
    labels = paths["t10k-labels-idx1-ubyte.gz"]
    first_inode = labels.stat().st_ino
    assert fetch_archives(preset("mnist"), uri, tmp_path) == paths
    assert labels.stat().st_ino == first_inode  # size and ETag matched: not downloaded again
    # Someone replaces the object: the cached copy no longer matches and is fetched anew.
    replacement = (data_dir / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes()
    s3.client.put_object(Bucket=s3.bucket, Key="datasets/mnist/t10k-labels-idx1-ubyte.gz",
                         Body=replacement)
    fetch_archives(preset("mnist"), uri, tmp_path)
    assert labels.read_bytes() == replacement
    assert not [p for p in tmp_path.rglob("*partial*")]


def test_data_pull_command_verifies(s3, data_dir, tmp_path):
    uri = push_mnist(s3, data_dir)
    result = run_cli("data", "pull", "mnist", uri, "--cache-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "60000 training and 10000 test images, verified" in result.stdout
    assert archive_sha256(data_dir, "mnist", "train-images-idx3-ubyte.gz") in result.stdout


def test_concurrent_pulls_by_two_processes(s3, data_dir, tmp_path):
    uri = push_mnist(s3, data_dir)
    command = [str(CNN_JOB), "data", "pull", "mnist", uri, "--cache-dir", str(tmp_path)]
    pulls = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for pull in pulls:
        out, err = pull.communicate(timeout=120)
        assert pull.returncode == 0, err
        assert "verified" in out
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in files if "partial" in p.name]
    for archive in preset("mnist").archives:
        (cached,) = [p for p in files if p.name == archive.name]
        assert cached.read_bytes() == (data_dir / "mnist" / archive.name).read_bytes()


def test_checkpoints_in_s3_pointer_retention_and_listing(s3, data_dir, tmp_path):
    uri = f"s3://{s3.bucket}/runs/a"
    summary = train(TrainConfig(dataset="mnist", data_uri=str(data_dir), checkpoint_uri=uri,
                                epochs=4, limit_train=640, keep_checkpoints=2, device="cpu",
                                cache_dir=tmp_path, summary_json=tmp_path / "s.json"))
    keys = sorted(o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket)["Contents"])
    assert keys == ["runs/a/latest", "runs/a/step-000000030.pt", "runs/a/step-000000040.pt"]
    pointer = s3.client.get_object(Bucket=s3.bucket, Key="runs/a/latest")["Body"].read()
    assert pointer == b"step-000000040.pt\n"
    assert summary["checkpoint"] == f"{uri}/step-000000040.pt"
    result = run_cli("checkpoints", "list", uri, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "step-0000000" in line]
    assert "step-000000040.pt" in lines[0] and "*" in lines[0] and "4" in lines[0]
    assert "step-000000030.pt" in lines[1] and "*" not in lines[1]
    assert f"{summary['final_val_acc']:.2%}" in lines[0]


def test_resume_falls_back_past_a_corrupt_newest_s3_checkpoint(s3, data_dir, tmp_path, capsys):
    uri = f"s3://{s3.bucket}/runs/b"
    settings = dict(dataset="mnist", data_uri=str(data_dir), checkpoint_uri=uri, limit_train=640,
                    device="cpu", cache_dir=tmp_path)
    train(TrainConfig(epochs=1, **settings))
    good = s3.client.get_object(Bucket=s3.bucket, Key="runs/b/step-000000010.pt")["Body"].read()
    s3.client.put_object(Bucket=s3.bucket, Key="runs/b/step-000000015.pt", Body=good[:5000])
    s3.client.put_object(Bucket=s3.bucket, Key="runs/b/latest", Body=b"step-000000015.pt\n")
    capsys.readouterr()
    summary = train(TrainConfig(epochs=2, **settings))
    out = capsys.readouterr().out.replace("\n", "")
    assert f"checkpoint {uri}/step-000000015.pt is unreadable" in out
    assert "falling back to step-000000010.pt" in out
    assert [h["step"] for h in summary["history"]] == [10, 20]


def test_no_loadable_checkpoint_is_a_clear_error(tmp_path, data_dir):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "step-000000010.pt").write_bytes(b"truncated")
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--checkpoint-uri",
                     str(folder), "--limit-train", "100", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: no loadable checkpoint in {folder}")
    assert (folder / "step-000000010.pt").read_bytes() == b"truncated"  # nothing overwritten


def test_training_from_s3_data_records_provenance_and_keeps_secrets_out(s3, data_dir, tmp_path):
    uri = push_mnist(s3, data_dir)
    result = run_cli("train", "mnist", "--data-uri", uri, "--checkpoint-uri",
                     f"s3://{s3.bucket}/runs/c", "--limit-train", "640", "--epochs", "1",
                     "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
                     "--summary-json", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["data_sha256"]["train-images-idx3-ubyte.gz"] == archive_sha256(
        data_dir, "mnist", "train-images-idx3-ubyte.gz")
    checkpoint = s3.client.get_object(Bucket=s3.bucket, Key="runs/c/step-000000010.pt")["Body"].read()
    state = torch.load(__import__("io").BytesIO(checkpoint), weights_only=True)
    assert state["data_sha256"] == summary["data_sha256"]
    for text in (result.stdout, result.stderr, (tmp_path / "s.json").read_text()):
        assert SECRET not in text and "cnn-job-test-key" not in text
    assert SECRET.encode() not in checkpoint and b"cnn-job-test-key" not in checkpoint


# ----------------------------------------------------------------------------------------------
# bad input: exit 2, one line


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert SECRET not in result.stderr + result.stdout
    return lines[0]


def test_unknown_bucket(s3, tmp_path):
    line = one_line_error(run_cli("train", "mnist", "--data-uri", "s3://no-such-bucket/data",
                                  "--checkpoint-uri", str(tmp_path / "c"), "--cache-dir", str(tmp_path)))
    assert "bucket no-such-bucket of s3://no-such-bucket/data does not exist" in line
    line = one_line_error(run_cli("train", "mnist", "--checkpoint-uri", "s3://no-such-bucket/c"))
    assert "bucket no-such-bucket" in line and "does not exist" in line


def test_missing_object(s3, tmp_path):
    line = one_line_error(run_cli("train", "mnist", "--data-uri", f"s3://{s3.bucket}/empty",
                                  "--checkpoint-uri", str(tmp_path / "c"), "--cache-dir", str(tmp_path)))
    assert f"s3://{s3.bucket}/empty/mnist/train-images-idx3-ubyte.gz does not exist" in line


def test_corrupt_archive_in_s3(s3, data_dir, tmp_path):
    uri = push_mnist(s3, data_dir)
    original = (data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    s3.client.put_object(Bucket=s3.bucket, Key="datasets/mnist/t10k-images-idx3-ubyte.gz",
                         Body=original[:50_000])
    line = one_line_error(run_cli("train", "mnist", "--data-uri", uri, "--checkpoint-uri",
                                  str(tmp_path / "c"), "--cache-dir", str(tmp_path)))
    assert "t10k-images-idx3-ubyte.gz is corrupt or truncated" in line


def test_push_refuses_a_corrupt_local_copy(s3, data_dir, tmp_path):
    import shutil

    shutil.copytree(data_dir / "mnist", tmp_path / "mnist")
    damaged = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    line = one_line_error(run_cli("data", "push", "mnist", f"s3://{s3.bucket}/d", "--from", str(tmp_path)))
    assert "corrupt or truncated" in line
    assert "Contents" not in s3.client.list_objects_v2(Bucket=s3.bucket)  # nothing uploaded


def test_missing_credentials(s3, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_PROFILE": "",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    env = {k: v for k, v in env.items()}
    clean = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID",
                                                               "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")}
    result = subprocess.run(
        [str(CNN_JOB), "train", "mnist", "--checkpoint-uri", f"s3://{s3.bucket}/c"],
        capture_output=True, text=True, timeout=120,
        env={**clean, **{k: v for k, v in env.items() if v}},
    )
    assert "no S3 credentials" in one_line_error(result)


def test_wrong_credentials(tmp_path):
    # A second server that checks signatures: no key it knows is ours.
    process, endpoint = start_s3_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env = {"AWS_ACCESS_KEY_ID": "AKIAWRONGKEY000000", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        line = one_line_error(run_cli("data", "pull", "mnist", "s3://bucket/datasets",
                                      "--cache-dir", str(tmp_path), env=env))
        assert "S3 refused the request" in line and "AWS_ACCESS_KEY_ID" in line
        assert "AKIAWRONGKEY000000" not in line
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_endpoint_that_does_not_answer_is_unavailable_not_bad_input(tmp_path):
    # Refused connections are an outage, retried for CNN_JOB_STORAGE_RETRY_S (none here), then
    # exit 69 (the manifests retry it); an endpoint that is not a URL at all is bad input.
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "us-east-1",
           "CNN_JOB_STORAGE_RETRY_S": "0"}
    started = time.monotonic()
    result = run_cli("train", "mnist", "--checkpoint-uri", "s3://bucket/c", env=env)
    assert result.returncode == 69, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: S3 endpoint http://127.0.0.1:9 unreachable for 0 s "
                           "(Connection refused) at s3://bucket/c")
    assert line.endswith("the checkpoints are intact: run the same command to resume once it "
                         "answers (exit status 69)")
    assert time.monotonic() - started < 60
    # --s3-endpoint-url wins over the environment
    line = one_line_error(run_cli("train", "mnist", "--checkpoint-uri", "s3://bucket/c",
                                  "--s3-endpoint-url", "ftp://127.0.0.1:7", env=env))
    assert line == ("error: S3 endpoint ftp://127.0.0.1:7 is not a URL; write it as "
                    "http(s)://HOST[:PORT] in --s3-endpoint-url / AWS_ENDPOINT_URL")
    assert sys.executable  # the CLI ran as its own process


def test_the_storage_retry_budget_is_a_setting(monkeypatch):
    assert TrainConfig(dataset="mnist").storage_retry_s == 300
    assert TrainConfig(dataset="mnist", storage_retry_s=0).storage_retry_s == 0
    with pytest.raises(JobError, match="--storage-retry-s -1 is not a number of seconds: it "
                                       "takes a finite number, 0 or more"):
        TrainConfig(dataset="mnist", storage_retry_s=-1)
    monkeypatch.setenv("CNN_JOB_STORAGE_RETRY_S", "12.5")
    assert S3Store("s3://b/p").retry_s == 12.5  # the commands without the option read the env
    assert S3Store("s3://b/p", retry_s=3).retry_s == 3
    monkeypatch.setenv("CNN_JOB_STORAGE_RETRY_S", "soon")
    with pytest.raises(JobError, match="CNN_JOB_STORAGE_RETRY_S='soon' is not a number of seconds"):
        S3Store("s3://b/p")
    monkeypatch.setenv("CNN_JOB_STORAGE_RETRY_S", "")  # a ConfigMap's placeholder: the default
    assert S3Store("s3://b/p").retry_s == 300
