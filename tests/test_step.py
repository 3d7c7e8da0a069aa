"""The training step's mode (--compile) and the start-up path. The CUDA graph itself, and its
numerics against the eager step, are tested on a GPU: tests/test_gpu.py (`pytest -m gpu`)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from job.batches import DeviceBatches
from job.config import TrainConfig
from job.datasets import preset
from job.errors import JobError
from job.optim import Adam
from job.recipes import load
from job.recipes.base import mean_cross_entropy
from job.step import TrainStep, resolve_compile
from tests.conftest import run_cli

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_graphs_one_gpu_only_and_cuda_graph_is_refused_where_it_cannot_run():
    assert resolve_compile("auto", CUDA, distributed=False) == "cuda-graph"
    assert resolve_compile("auto", CUDA, distributed=True) == "off"
    assert resolve_compile("auto", CPU, distributed=False) == "off"
    assert resolve_compile("off", CUDA, distributed=False) == "off"
    assert resolve_compile("cuda-graph", CUDA, distributed=False) == "cuda-graph"
    with pytest.raises(JobError, match="needs a CUDA device"):
        resolve_compile("cuda-graph", CPU, distributed=False)
    with pytest.raises(JobError, match="runs one process"):
        resolve_compile("cuda-graph", CUDA, distributed=True)
    with pytest.raises(JobError, match="--compile max-autotune is not one of auto, off, cuda-graph"):
        TrainConfig(dataset="mnist", compile="max-autotune")


def test_cuda_graph_on_the_cpu_is_one_line_and_exit_2_before_any_work(tmp_path, data_dir):
    folder = tmp_path / "ckpt"
    result = run_cli("train", "mnist", "--device", "cpu", "--compile", "cuda-graph",
                     "--data-uri", str(data_dir), "--checkpoint-uri", str(folder),
                     "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --compile cuda-graph needs a CUDA device: use --compile auto or off on cpu"]
    assert not folder.exists() and not (tmp_path / "cache").exists()  # nothing claimed or fetched


def test_the_eager_step_is_torch_adams_step(mnist):
    """TrainStep (eager, as on CPU) against the step as written before it, with torch.optim."""
    torch.manual_seed(0)
    ours_model = load("mnist", "seed").build_model().to(memory_format=torch.channels_last)
    theirs_model = load("mnist", "seed").build_model().to(memory_format=torch.channels_last)
    theirs_model.load_state_dict(ours_model.state_dict())
    autocast = lambda **kw: torch.autocast("cpu", torch.bfloat16, enabled=False, **kw)  # noqa: E731
    step = TrainStep(ours_model, Adam(ours_model.parameters(), 1e-3), autocast, graphed=False,
                     say=print, batch_size=64, criterion=mean_cross_entropy)
    theirs = torch.optim.Adam(theirs_model.parameters(), lr=1e-3, fused=True)
    batches = DeviceBatches(mnist.train_images[:300], mnist.train_labels[:300], preset("mnist"),
                            CPU, 64, shuffle=True, seed=0)
    for index, (images, labels) in enumerate(batches.epoch(0)):  # the last batch is short (44)
        lr = 1e-3 * (1 - index / 5)
        loss = step(images, labels, lr)
        for group in theirs.param_groups:
            group["lr"] = lr
        expected = F.cross_entropy(theirs_model(images), labels)
        theirs.zero_grad(set_to_none=True)
        expected.backward()
        theirs.step()
        assert torch.equal(loss, expected.detach())
    assert step.mode == "off"
    assert all(torch.equal(p, q) for p, q in zip(ours_model.parameters(), theirs_model.parameters()))


def test_a_training_process_starts_without_torch_compiler_and_times_its_start(tmp_path, data_dir):
    """torch.optim would import torch._dynamo (1.1 s) on its first use: the job's own Adam does
    not, nor does anything else on the path from start to summary. The summary records the
    process's seconds to its first step and to the summary."""
    summary = tmp_path / "s.json"
    script = (
        "import sys, json\n"
        "from job.config import TrainConfig\n"
        "from job.train import train\n"
        f"train(TrainConfig(dataset='cifar10', epochs=1, limit_train=64, device='cpu', "
        f"data_uri={str(data_dir)!r}, cache_dir={str(tmp_path / 'cache')!r}, "
        f"checkpoint_uri={str(tmp_path / 'ckpt')!r}, summary_json={str(summary)!r}, "
        "wandb_mode='disabled', eval_batch_size=2000))\n"
        "loaded = [m for m in ('torch._dynamo', 'torch._inductor', 'triton', 'sympy') if m in sys.modules]\n"
        "print(json.dumps(loaded))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    written = json.loads(summary.read_text())
    assert written["compile"] == "off"
    assert 0.1 < written["seconds_to_first_step"] < written["seconds_to_summary"]


FAULTS_PER_STEP = """
import json, resource, sys
import torch
from job.recipes import load
from job.recipes.base import mean_cross_entropy
from job.step import TrainStep, autocast_for, tune_device
if sys.argv[1] == "tuned":
    tune_device(torch.device("cpu"))
torch.manual_seed(0)
recipe = load("cifar10", "seed")
model = recipe.build_model().to(memory_format=torch.channels_last)
optimizer = recipe.start(model, None, 1e-3).optimizer
step = TrainStep(model, optimizer, autocast_for("fp32", torch.device("cpu")), graphed=False,
                 say=print, batch_size=64, criterion=mean_cross_entropy)
def batch():  # a new batch each step, as the loop's batches are
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    return images.float().div_(255), torch.randint(0, 10, (64,))
for _ in range(3):
    step(*batch(), 1e-3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step(*batch(), 1e-3)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10))
"""


def test_a_cpu_step_reuses_the_memory_of_the_one_before():
    """tune_device fixes glibc malloc's thresholds: left adaptive, every seed CIFAR-10 step mapped
    its 24 MB of activations and gradients afresh, thousands of page faults a step (20-30% of
    its CPU images/s). Page faults are counted by the kernel: no timing, so no load changes it."""
    faults = {how: json.loads(subprocess.run(
        [sys.executable, "-c", FAULTS_PER_STEP, how], check=True, capture_output=True,
        text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}).stdout)
        for how in ("tuned", "untuned")}
    assert faults["tuned"] < 400, faults  # 50-180 seen; untuned, 2,600-7,500
    assert faults["untuned"] > 3 * faults["tuned"], faults
