"""`cnn-job evaluate` and `cnn-job predict` on checkpoints of real short training runs: the
accuracy training reported, exactly; the same classes from images as from the archives; S3 in
and out; torchrun; and every bad input as one line with exit status 2."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from job.checkpoint import load_checkpoint
from job.cli import app
from job.datasets import preset
from job.errors import JobError
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error
from tests.trained_runs import trained_run, write_cifar_batch, write_mnist_idx, write_pngs

runner = CliRunner()


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, data_dir):
    return trained_run("mnist", tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory, data_dir):
    return trained_run("cifar10", tmp_path_factory, data_dir)


def evaluate_json(*args: str) -> dict:
    """`cnn-job evaluate ... --json -` in process: the report."""
    result = runner.invoke(app, ["evaluate", *args, "--json", "-"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------
# evaluate


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_evaluate_reports_exactly_the_accuracy_training_reported(dataset, tmp_path, data_dir,
                                                                 tmp_path_factory):
    run = trained_run(dataset, tmp_path_factory, data_dir)
    # The folder (its `latest`) through the real console script, with the tables on stdout.
    result = run_cli("evaluate", str(run.folder), "--data-uri", str(data_dir), "--json",
                     str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["accuracy"] == run.summary["final_val_acc"]
    assert report["loss"] == run.summary["final_val_loss"]
    assert report["training_val_acc"] == run.summary["final_val_acc"]
    assert report["checkpoint"] == str(run.checkpoint) and report["same_data_as_training"] is True
    assert report["images"] == 10_000 == sum(map(sum, report["confusion_matrix"]))
    assert report["correct"] == sum(report["confusion_matrix"][i][i] for i in range(10))
    names = list(preset(dataset).class_names)
    assert report["class_names"] == names and list(report["per_class_accuracy"]) == names
    row = report["confusion_matrix"][3]
    assert report["per_class_accuracy"][names[3]] == pytest.approx(row[3] / sum(row))
    for text in ("accuracy per class", "confusion matrix", f"{run.summary['final_val_acc']:.2%}",
                 names[-1], "training reported"):
        assert text in result.stdout, text


def test_evaluate_a_checkpoint_file_on_the_users_own_test_files(mnist_run, cifar_run, data_dir,
                                                                tmp_path, mnist, cifar10):
    # MNIST's own test archives, named as files, in either order: the run's data exactly.
    files = [str(data_dir / "mnist" / f"t10k-{kind}-ubyte.gz") for kind in ("labels-idx1", "images-idx3")]
    report = evaluate_json(str(mnist_run.checkpoint), "--test-data", files[0], "--test-data", files[1])
    assert report["accuracy"] == mnist_run.summary["final_val_acc"]
    assert report["same_data_as_training"] is True
    # A user's own 300 images in CIFAR-10's batch format (other data: said on stderr).
    batch = write_cifar_batch(cifar10.test_images[:300], cifar10.test_labels[:300], tmp_path / "mine")
    result = runner.invoke(app, ["evaluate", str(cifar_run.checkpoint), "--test-data", str(batch),
                                 "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 300 and report["same_data_as_training"] is None
    assert report["data_sha256"] == {"mine": hashlib.sha256(batch.read_bytes()).hexdigest()}


def test_evaluate_in_and_out_of_s3(s3, mnist_run, data_dir):
    for path in mnist_run.folder.iterdir():
        s3.client.upload_file(str(path), s3.bucket, f"runs/m/{path.name}")
    prefix = f"s3://{s3.bucket}/runs/m"
    out = f"s3://{s3.bucket}/reports/m.json"
    for checkpoint in (prefix, f"{prefix}/{mnist_run.checkpoint.name}"):
        result = runner.invoke(app, ["evaluate", checkpoint, "--data-uri", str(data_dir), "--json", out])
        assert result.exit_code == 0, result.output
        report = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="reports/m.json")["Body"].read())
        assert report["accuracy"] == mnist_run.summary["final_val_acc"]
        assert report["checkpoint"] == f"{prefix}/{mnist_run.checkpoint.name}"


def test_evaluate_under_torchrun_shards_and_sums(mnist_run, data_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "job",
         "evaluate", str(mnist_run.folder), "--data-uri", str(data_dir), "--json",
         str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["world_size"] == 2 and report["images"] == 10_000
    assert report["accuracy"] == mnist_run.summary["final_val_acc"]
    assert report["loss"] == pytest.approx(mnist_run.summary["final_val_loss"], rel=1e-6)
    assert result.stdout.count("accuracy per class") == 1  # rank 0 prints, the other does not


# ----------------------------------------------------------------------------------------------
# predict


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_predict_on_pngs_gives_the_classes_evaluate_counts(dataset, tmp_path, data_dir,
                                                           tmp_path_factory, request):
    run = trained_run(dataset, tmp_path_factory, data_dir)
    split = request.getfixturevalue(dataset)
    images, labels = split.test_images[:200], split.test_labels[:200]
    pngs = write_pngs(images, tmp_path / "png")
    result = runner.invoke(app, ["predict", str(run.folder), *map(str, pngs), "--json", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    predictions = [json.loads(line) for line in result.stdout.splitlines()]
    assert [p["image"] for p in predictions] == list(map(str, pngs))
    for p in predictions:
        probabilities = [guess["probability"] for guess in p["top"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
    # evaluate on the same images in the archive format: the same confusion matrix.
    if dataset == "mnist":
        files = write_mnist_idx(images, labels, tmp_path / "idx")
    else:
        files = [write_cifar_batch(images, labels, tmp_path / "batch")]
    report = evaluate_json(str(run.folder), *[arg for f in files for arg in ("--test-data", str(f))])
    confusion = np.zeros((10, 10), dtype=int)
    for label, p in zip(labels.tolist(), predictions):
        confusion[label, p["top"][0]["index"]] += 1
    assert confusion.tolist() == report["confusion_matrix"]
    # The plain output: one line per image, the classes by name.
    names = preset(dataset).class_names
    plain = runner.invoke(app, ["predict", str(run.checkpoint), str(pngs[0]), "--top-k", "2"])
    top = predictions[0]["top"]
    assert plain.stdout == (f"{pngs[0]}  {names[top[0]['index']]} {top[0]['probability']:.2%}  "
                            f"{names[top[1]['index']]} {top[1]['probability']:.2%}\n")


def test_predict_reads_images_from_s3(s3, mnist_run, mnist, tmp_path):
    (png,) = write_pngs(mnist.test_images[:1], tmp_path)
    s3.client.upload_file(str(png), s3.bucket, "images/digit.png")
    result = run_cli("predict", str(mnist_run.folder), f"s3://{s3.bucket}/images/digit.png",
                     str(png), "--json", env=s3.env)
    assert result.returncode == 0, result.stderr
    from_s3, local = (json.loads(line) for line in result.stdout.splitlines())
    assert from_s3["image"] == f"s3://{s3.bucket}/images/digit.png"
    assert from_s3["top"] == local["top"]


# ----------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written


def test_not_a_checkpoint(tmp_path, mnist_run):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.pt")
    (tmp_path / "empty").mkdir()
    # through the console script: one line, exit 2, no report
    result = run_cli("evaluate", str(tmp_path / "notes.pt"), "--json", str(tmp_path / "r.json"))
    assert_one_line_error(result, str(tmp_path / "notes.pt"), "not a loadable torch file")
    result = run_cli("predict", str(tmp_path / "dict.pt"), "x.png", "--json")
    assert_one_line_error(result, str(tmp_path / "dict.pt"), "not a cnn-job checkpoint (no 'model')")
    assert not (tmp_path / "r.json").exists() and result.stdout == ""
    for path, fragment in ((tmp_path / "empty", "no checkpoints in"),
                           (tmp_path / "missing.pt", "does not exist")):
        with pytest.raises(JobError, match=fragment):
            load_checkpoint(str(path))
    # weights of another shape under the right keys
    state = torch.load(mnist_run.checkpoint, weights_only=True)
    state["config"]["dataset"] = "cifar10"
    torch.save(state, tmp_path / "mislabelled.pt")
    with pytest.raises(JobError, match="its weights do not fit the cifar10 net"):
        load_checkpoint(str(tmp_path / "mislabelled.pt")).model(torch.device("cpu"))


def test_checkpoint_of_the_other_dataset_than_the_data(mnist_run, cifar10, tmp_path):
    batch = write_cifar_batch(cifar10.test_images[:10], cifar10.test_labels[:10], tmp_path / "b")
    result = run_cli("evaluate", str(mnist_run.folder), "--test-data", str(batch),
                     "--json", str(tmp_path / "r.json"))
    assert_one_line_error(result, "is a mnist checkpoint", "holds cifar10 data", "pass mnist test data")
    assert not (tmp_path / "r.json").exists()


def test_images_that_do_not_decode_stop_before_any_output(mnist_run, mnist, tmp_path):
    (good,) = write_pngs(mnist.test_images[:1], tmp_path)
    (tmp_path / "text.png").write_text("hello")
    result = run_cli("predict", str(mnist_run.folder), str(good), str(tmp_path / "text.png"))
    assert_one_line_error(result, str(tmp_path / "text.png"), "is not a PNG or JPEG image")
    assert result.stdout == ""  # not even the good image's line
    result = runner.invoke(app, ["predict", str(mnist_run.folder), str(good), str(tmp_path / "none.png")])
    assert result.exit_code == 2 and result.stdout == ""
    assert f"error: cannot read {tmp_path / 'none.png'}" in result.stderr


def test_unwritable_report_is_refused_before_evaluating(mnist_run, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_cli("evaluate", str(mnist_run.folder), "--json", str(tmp_path / "file" / "r.json"),
                     "--data-uri", "/nonexistent")
    assert_one_line_error(result, "--json", f"there is no folder {tmp_path / 'file'}")
    # the one rule for every output file: its folder must exist (as --summary-json's must)
    result = runner.invoke(app, ["evaluate", str(mnist_run.folder), "--json",
                                 str(tmp_path / "new" / "r.json"), "--data-uri", "/nonexistent"])
    assert result.exit_code == 2 and not (tmp_path / "new").exists()
    assert result.stderr == (f"error: --json {tmp_path / 'new' / 'r.json'}: there is no folder "
                             f"{tmp_path / 'new'}; create it first, or name a file in a folder that exists\n")
    result = run_cli("evaluate", str(mnist_run.folder), "--json", str(tmp_path))
    assert_one_line_error(result, "is not a regular file")


def test_test_data_errors_name_the_users_file_and_give_advice_that_applies(mnist_run, mnist, tmp_path):
    images, labels = write_mnist_idx(mnist.test_images[:10], mnist.test_labels[:10], tmp_path)
    bad_magic = tmp_path / "badmagic-images.gz"
    bad_magic.write_bytes(gzip.compress(b"\x00\x00\x09\x03" + bytes(100)))
    truncated = tmp_path / "cut-images.gz"
    truncated.write_bytes(images.read_bytes()[:200])
    for bad, reason in ((bad_magic, "no IDX header"), (truncated, "corrupt or truncated")):
        result = runner.invoke(app, ["evaluate", str(mnist_run.folder), "--test-data", str(bad),
                                     "--test-data", str(labels)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: --test-data {bad} is corrupt or truncated (")
        assert reason in result.stderr and "check that file" in result.stderr
        assert "cnn-job-test-data" not in result.stderr and "fetch" not in result.stderr


def test_test_data_with_zero_images_is_one_line(mnist_run, mnist, tmp_path):
    files = write_mnist_idx(mnist.test_images[:0], mnist.test_labels[:0], tmp_path)
    result = run_cli("evaluate", str(mnist_run.folder), *[a for f in files for a in ("--test-data", str(f))])
    assert_one_line_error(result, f"--test-data {files[0]} {files[1]} holds no images")
    assert result.stdout == ""


def test_test_data_label_out_of_range_is_one_line(mnist_run, mnist, tmp_path):
    labels = mnist.test_labels[:10].clone()
    labels[3] = 12
    files = write_mnist_idx(mnist.test_images[:10], labels, tmp_path)
    result = runner.invoke(app, ["evaluate", str(mnist_run.folder), "--test-data", str(files[0]),
                                 "--test-data", str(files[1])])
    assert result.exit_code == 2
    assert result.stderr.endswith("labels outside 0..9 (from 1 to 12)\n") and result.stderr.count("\n") == 1


def test_evaluation_of_an_empty_split_is_a_job_error_not_a_division_by_zero():
    from job.batches import DeviceBatches
    from job.distributed import Dist
    from job.evaluation import evaluate
    from job.recipes import load

    cpu = torch.device("cpu")
    empty = DeviceBatches(torch.zeros(0, 28, 28, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                          preset("mnist"), cpu, 100, shuffle=False)
    with pytest.raises(JobError, match="the test split holds no images"):
        evaluate(load("mnist", "seed").build_model(), empty, Dist(0, 0, 1, cpu),
                 lambda: torch.autocast("cpu", enabled=False), 10)
