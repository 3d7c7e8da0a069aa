"""GPU-only tests (`pytest -m gpu`, which `make gpu-check` runs): skipped where no CUDA GPU is."""

import pytest
import torch

from job.config import preset
from job.data import DeviceBatches
from job.models import build_model
from job.train import train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def one_step(device: str, mnist, precision_bf16: bool = False) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = build_model("mnist").to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    batches = DeviceBatches(mnist.train_images[:256], mnist.train_labels[:256], preset("mnist"),
                            torch.device(device), 256, shuffle=True, seed=0)
    images, labels = next(iter(batches.epoch(0)))
    autocast = lambda: torch.autocast(device, torch.bfloat16, enabled=precision_bf16)  # noqa: E731
    loss = train_step(model, optimizer, images, labels, 1e-3, autocast).item()
    return loss, {k: v.float().cpu() for k, v in model.state_dict().items()}


def test_a_cuda_step_matches_the_cpu_step(mnist):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    cpu_loss, cpu_weights = one_step("cpu", mnist)
    cuda_loss, cuda_weights = one_step("cuda", mnist)
    assert cuda_loss == pytest.approx(cpu_loss, rel=1e-4)
    for name in cpu_weights:
        torch.testing.assert_close(cuda_weights[name], cpu_weights[name], rtol=1e-3, atol=1e-5)


def test_bf16_autocast_step_is_close_to_fp32(mnist):
    fp32_loss, _ = one_step("cuda", mnist)
    bf16_loss, _ = one_step("cuda", mnist, precision_bf16=True)
    assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2)
