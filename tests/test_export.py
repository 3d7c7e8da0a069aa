"""`cnn-job export` of real checkpoints: ONNX checked with onnxruntime against PyTorch on 1,000
real test images, a torch.export program loaded by torch alone, safetensors weights, the serving
metadata each carries, S3 in and out, and outputs that land whole or not at all."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from job.batches import DeviceBatches
from job.datasets import preset
from job.export import SERVING_KEY
from job.recipes import load
from tests.conftest import fill, run_cli
from tests.test_cli import assert_one_line_error
from tests.trained_runs import trained_run


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, data_dir):
    return trained_run("mnist", tmp_path_factory, data_dir)


def export(checkpoint, fmt: str, output, **kwargs):
    result = run_cli("export", str(checkpoint), "--format", fmt, "--output", str(output), **kwargs)
    assert result.returncode == 0, result.stderr
    return result


def normalised_test_images(split, dataset: str, count: int = 1000) -> torch.Tensor:
    """The first `count` test images as the net takes them (the training pipeline's batches)."""
    batches = DeviceBatches(split.test_images[:count], split.test_labels[:count], preset(dataset),
                            torch.device("cpu"), count, shuffle=False)
    images, _ = next(iter(batches.epoch(0)))
    return images.contiguous()


def reference_logits(checkpoint, dataset: str, images: torch.Tensor) -> torch.Tensor:
    model = load(dataset, "seed").build_model().eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    with torch.no_grad():
        return model(images)


def assert_serving_metadata(metadata: dict, run, fmt: str, dataset: str) -> None:
    p = preset(dataset)
    state = torch.load(run.checkpoint, weights_only=True)
    assert metadata["format"] == fmt and metadata["dataset"] == dataset
    assert metadata["input_name"] == "images" and metadata["output_name"] == "logits"
    assert metadata["input_shape"] == ["batch", p.channels, p.image_size, p.image_size]
    assert metadata["input_layout"] == "NCHW"
    assert metadata["channel_order"] == ("grayscale" if p.channels == 1 else "RGB")
    assert (metadata["mean"], metadata["std"]) == (list(p.mean), list(p.std))
    assert metadata["class_names"] == list(p.class_names)
    assert metadata["val_acc"] == run.summary["final_val_acc"]
    assert (metadata["step"], metadata["epoch"]) == (state["step"], state["epoch"])
    assert metadata["run_id"] == state["run"]["id"] and metadata["data_sha256"] == state["data_sha256"]
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert metadata["git_commit"] == (os.environ.get("GIT_COMMIT") or git)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_onnx_matches_pytorch_on_1000_test_images(dataset, tmp_path, data_dir, tmp_path_factory,
                                                  request):
    import onnx
    import onnxruntime

    run = trained_run(dataset, tmp_path_factory, data_dir)
    export(run.folder, "onnx", tmp_path / "net.onnx")
    images = normalised_test_images(request.getfixturevalue(dataset), dataset)
    expected = reference_logits(run.checkpoint, dataset, images)
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": images.numpy()})
    assert got.shape == (1000, 10)
    assert np.abs(got - expected.numpy()).max() <= 1e-4
    assert np.array_equal(got.argmax(1), expected.argmax(1).numpy())
    for batch in (1, 7):  # the batch dimension is dynamic
        (few,) = session.run(["logits"], {"images": images[:batch].numpy()})
        assert np.abs(few - expected[:batch].numpy()).max() <= 1e-4
    model = onnx.load(str(tmp_path / "net.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # named, not fixed
    props = {prop.key: prop.value for prop in model.metadata_props}
    assert_serving_metadata(json.loads(props[SERVING_KEY]), run, "onnx", dataset)


def test_torch_export_program_loads_without_this_package(mnist_run, mnist, tmp_path):
    export(mnist_run.checkpoint, "torch-export", tmp_path / "net.pt2")
    images = normalised_test_images(mnist, "mnist", 100)
    torch.save(images, tmp_path / "images.pt")
    # A fresh interpreter in which `import job` fails: torch alone loads and runs the program.
    script = f"""
import json, sys, torch
sys.modules["job"] = None
extra = {{"{SERVING_KEY}.json": ""}}
program = torch.export.load({str(tmp_path / "net.pt2")!r}, extra_files=extra)
images = torch.load({str(tmp_path / "images.pt")!r})
net = program.module()
torch.save({{"all": net(images), "three": net(images[:3])}}, {str(tmp_path / "out.pt")!r})
print(extra["{SERVING_KEY}.json"])
"""
    result = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_serving_metadata(json.loads(result.stdout), mnist_run, "torch-export", "mnist")
    outputs = torch.load(tmp_path / "out.pt")
    expected = reference_logits(mnist_run.checkpoint, "mnist", images)
    assert torch.allclose(outputs["all"], expected, atol=1e-5)
    assert torch.allclose(outputs["three"], expected[:3], atol=1e-5)


def test_safetensors_are_the_nets_weights(mnist_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    export(mnist_run.checkpoint, "safetensors", tmp_path / "net.safetensors")
    model = load("mnist", "seed").build_model()
    model.load_state_dict(load_file(tmp_path / "net.safetensors"))  # strict: every name, every shape
    saved = torch.load(mnist_run.checkpoint, weights_only=True)["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    with safe_open(tmp_path / "net.safetensors", "pt") as handle:
        metadata = json.loads(handle.metadata()[SERVING_KEY])
    assert_serving_metadata(metadata, mnist_run, "safetensors", "mnist")


def test_export_from_and_to_s3(s3, mnist_run, tmp_path):
    for path in mnist_run.folder.iterdir():
        s3.client.upload_file(str(path), s3.bucket, f"runs/m/{path.name}")
    result = export(f"s3://{s3.bucket}/runs/m", "safetensors", f"s3://{s3.bucket}/models/m.safetensors",
                    env=s3.env)
    assert result.stdout.startswith(f"s3://{s3.bucket}/models/m.safetensors  safetensors")
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="models/")["Contents"]]
    assert keys == ["models/m.safetensors"]
    body = s3.client.get_object(Bucket=s3.bucket, Key="models/m.safetensors")["Body"].read()
    (tmp_path / "m.safetensors").write_bytes(body)
    export(mnist_run.checkpoint, "safetensors", tmp_path / "local.safetensors")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "m.safetensors").keys() == load_file(tmp_path / "local.safetensors").keys()
    # a bucket that is not there: refused before the export, nothing written anywhere
    result = run_cli("export", str(mnist_run.folder), "--format", "onnx", "--output",
                     "s3://no-such-bucket/m.onnx", env=s3.env)
    assert_one_line_error(result, "bucket no-such-bucket", "does not exist")


def test_bad_exports_are_one_line_and_leave_nothing(mnist_run, tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    as_plain_user = ["setpriv", "--bounding-set=-dac_override"] if os.geteuid() == 0 else []
    result = run_cli("export", str(mnist_run.folder), "--format", "onnx", "--output",
                     str(readonly / "m.onnx"), prefix=as_plain_user)
    assert_one_line_error(result, f"output folder {readonly} is not writable", "--output")
    assert list(readonly.iterdir()) == []
    # not a checkpoint: the file already at the output stays as it was
    (tmp_path / "old.onnx").write_bytes(b"previous export")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    result = run_cli("export", str(tmp_path / "junk.pt"), "--format", "onnx", "--output",
                     str(tmp_path / "old.onnx"))
    assert_one_line_error(result, "junk.pt", "not a loadable torch file")
    assert (tmp_path / "old.onnx").read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "old.onnx", "readonly"]
    result = run_cli("export", str(mnist_run.folder), "--format", "torchscript", "--output", "m.pt")
    assert_one_line_error(result, "--format torchscript is not one of", "use --format torch-export")


def test_an_export_onto_a_full_filesystem_is_one_line_and_keeps_what_was_there(
        mnist_run, tmp_path, tmpfs):
    full = tmpfs(tmp_path / "full", size_mb=1)
    (full / "net.onnx").write_bytes(b"previous export")
    fill(full)
    result = run_cli("export", str(mnist_run.folder), "--format", "onnx", "--output",
                     str(full / "net.onnx"))
    assert_one_line_error(result, f"cannot write --output {full / 'net.onnx'} (No space left "
                          "on device); nothing was written: free space there, or pass another "
                          "--output")
    assert (full / "net.onnx").read_bytes() == b"previous export"
    assert sorted(p.name for p in full.iterdir()) == ["filler", "net.onnx"]


# The export, started from python with an import hook that holds the first import of a
# torch._dynamo submodule (torch._dynamo itself half initialised) until the test says go. It
# holds inside an object's finalizer: Python ignores an exception raised there, as it does for a
# signal handler's exception that lands in any finalizer while torch imports, which is how a
# SIGTERM used to leave torch._dynamo half imported and the export failing with torch's error.
HELD_EXPORT = """
import sys, time
from pathlib import Path
held, go = Path(sys.argv[1]), Path(sys.argv[2])

class Waiter:
    def __del__(self):
        while not go.exists():
            time.sleep(0.01)

class HoldDynamo:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("torch._dynamo.") and not held.exists():
            held.touch()
            Waiter()  # collected at once: __del__ waits for the test's go
        return None

sys.meta_path.insert(0, HoldDynamo())
sys.argv = ["cnn-job", *sys.argv[3:]]
from job.cli import main
main()
"""


def test_sigterm_while_torch_dynamo_is_imported_stops_the_export_with_75(mnist_run, tmp_path):
    held, go, output = tmp_path / "held", tmp_path / "go", tmp_path / "m.onnx"
    command = [sys.executable, "-c", HELD_EXPORT, str(held), str(go), "export", str(mnist_run.folder),
               "--format", "onnx", "--output", str(output)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while not held.exists():  # a state, not a sleep: the import of torch._dynamo has begun
            assert process.poll() is None, process.communicate()
            time.sleep(0.01)  # (a polling interval: the wait is on the file)
        process.send_signal(signal.SIGTERM)
        # The handler runs in the main thread, which is in the finalizer's loop: it has run once
        # the process shows no pending SIGTERM (SigPnd/ShdPnd clear of bit 15).
        while _pending_signals(process.pid) & (1 << (signal.SIGTERM - 1)):
            time.sleep(0.001)
        go.touch()
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 75, stderr
    assert stderr == ("error: stopped by SIGTERM before it finished, leaving nothing half-written: run "
                      "the same command again (exit status 75)\n") and stdout == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["go", "held"]  # no output, no temp


def _pending_signals(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
