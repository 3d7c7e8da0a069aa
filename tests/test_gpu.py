"""GPU-only tests (`pytest -m gpu`, which `make gpu-check` runs): skipped where no CUDA GPU is."""

import math

import pytest
import torch

from job.batches import DeviceBatches
from job.datasets import preset
from job.optim import Adam
from job.recipes import load
from job.recipes.base import mean_cross_entropy
from job.step import WARMUP_STEPS, TrainStep

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def trained(device: str, splits, *, steps: int, graphed: bool = False, bf16: bool = False,
            batch_size: int = 64, dataset: str = "mnist", images: int | None = None):
    """Losses of `steps` steps (a changing learning rate) from one seed, and the weights after."""
    torch.manual_seed(0)
    model = load(dataset, "seed").build_model().to(device, memory_format=torch.channels_last)
    autocast = lambda **kw: torch.autocast(device, torch.bfloat16, enabled=bf16, **kw)  # noqa: E731
    step = TrainStep(model, Adam(model.parameters(), 1e-3), autocast, graphed=graphed,
                     say=print, batch_size=batch_size, criterion=mean_cross_entropy)
    n = images or steps * batch_size
    batches = DeviceBatches(splits.train_images[:n], splits.train_labels[:n], preset(dataset),
                            torch.device(device), batch_size, shuffle=True, seed=0)
    losses = []
    for index, (x, y) in enumerate(batches.epoch(0)):
        losses.append(step(x, y, 1e-3 * (1 - index / (2 * steps))).clone())
    return [loss.item() for loss in losses], {k: v.float().cpu() for k, v in
                                              model.state_dict().items()}, step


@pytest.fixture
def deterministic():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = saved


def test_a_cuda_step_matches_the_cpu_step(mnist, deterministic):
    cpu_losses, cpu_weights, _ = trained("cpu", mnist, steps=1, batch_size=256)
    cuda_losses, cuda_weights, _ = trained("cuda", mnist, steps=1, batch_size=256)
    assert cuda_losses[0] == pytest.approx(cpu_losses[0], rel=1e-4)
    for name in cpu_weights:
        torch.testing.assert_close(cuda_weights[name], cpu_weights[name], rtol=1e-3, atol=1e-5)


def test_bf16_autocast_step_is_close_to_fp32(mnist):
    fp32_losses, _, _ = trained("cuda", mnist, steps=1, batch_size=256)
    bf16_losses, _, _ = trained("cuda", mnist, steps=1, batch_size=256, bf16=True)
    assert bf16_losses[0] == pytest.approx(fp32_losses[0], rel=2e-2)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_the_graphed_step_computes_what_the_eager_step_does(request, dataset, deterministic):
    """Warm-up, capture and replays (with each step's learning rate), then a short last batch
    run eagerly: the same losses and weights as eager steps throughout."""
    splits = request.getfixturevalue(dataset)
    steps = WARMUP_STEPS + 8
    n = steps * 64 + 40  # a short last batch of 40
    eager_losses, eager_weights, _ = trained("cuda", splits, steps=steps, dataset=dataset, images=n)
    graph_losses, graph_weights, step = trained("cuda", splits, steps=steps, dataset=dataset,
                                                images=n, graphed=True)
    assert step.mode == "cuda-graph" and step.graph is not None
    assert len(graph_losses) == steps + 1
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for name in eager_weights:
        torch.testing.assert_close(graph_weights[name], eager_weights[name], rtol=1e-5, atol=1e-6)


def test_the_graphed_step_with_bf16_autocast_trains(mnist):
    losses, _, step = trained("cuda", mnist, steps=60, graphed=True, bf16=True)
    assert step.graph is not None
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10  # it learns


def test_a_failed_capture_trains_on_eagerly_on_the_default_stream(mnist):
    """A net that reads a value back to the host mid-step cannot be captured: the run says so in
    one line and trains on eagerly, on the stream it trained on before (not the capture's)."""

    class ReadsBack(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, images):
            if not torch.isfinite(images.sum()).item():  # a sync: no graph can hold it
                raise AssertionError("the images are not finite")
            return self.net(images)

    torch.manual_seed(0)
    model = ReadsBack(load("mnist", "seed").build_model()).to("cuda", memory_format=torch.channels_last)
    said = []
    step = TrainStep(model, Adam(model.parameters(), 1e-3), lambda **kw: torch.autocast(
        "cuda", torch.bfloat16, **kw), graphed=True, say=said.append, batch_size=64,
        criterion=mean_cross_entropy)
    batches = DeviceBatches(mnist.train_images[:64 * 8], mnist.train_labels[:64 * 8],
                            preset("mnist"), torch.device("cuda"), 64, shuffle=True, seed=0)
    losses = [step(x, y, 1e-3).item() for x, y in batches.epoch(0)]
    assert step.mode == "off" and step.graph is None
    assert len(said) == 1 and said[0].startswith("CUDA graph capture failed (")
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
