"""One epoch to ≥ 99%

A three-convolution BatchNorm CNN of 29,434 weights, one epoch of batch 256 with Adam at a
high rate and short memory (lr 0.01, betas 0.7 and 0.9) on the triangle schedule: mean
cross-entropy, no augmentation, no dropout. Designed from the facts of the best known record
(tuomaso/train_mnist_fast: 99.04% mean in one epoch, the whole set on the GPU, batch 256, a
one-cycle rate, Adam at 0.01 with betas (0.7, 0.9), a small CNN without dropout); its layers
are this project's own choice among those tried on a 2-core CPU (docs/recipes.md).
"""

from __future__ import annotations

from torch import nn

from job.batches import DeviceBatches
from job.optim import Adam
from job.recipes import base
from job.recipes.augment import SHIFTS

# ----------------------------------------------------------------------------------------------
# defaults (a plain literal: --help reads it without importing this module)

DEFAULTS = {"epochs": 1, "batch_size": 256, "lr": 0.01, "lr_schedule": "triangle",
            "augment": False, "tta": False}

BETAS = (0.7, 0.9)  # Adam's: a short memory suits a run of 235 steps
WIDTHS = (16, 32, 64)  # the three convolutions' channels

# ----------------------------------------------------------------------------------------------
# the net


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    # No bias: the BatchNorm after it has one.
    return [nn.Conv2d(in_channels, out_channels, kernel_size, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class FastMnistNet(nn.Sequential):
    """1×28×28 → conv 5×5 16 → pool → conv 3×3 32 → pool → conv 3×3 64 → linear 576→10: the
    sides go 24, 12, 10, 5, 3 (no padding), each conv followed by BatchNorm and ReLU."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = WIDTHS) -> None:
        first, second, third = widths
        super().__init__(
            *conv_bn_relu(1, first, 5), nn.MaxPool2d(2),
            *conv_bn_relu(first, second, 3), nn.MaxPool2d(2),
            *conv_bn_relu(second, third, 3),
            nn.Flatten(), nn.Linear(third * 3 * 3, num_classes),
        )


# ----------------------------------------------------------------------------------------------
# the recipe


class Recipe(base.Recipe):
    tta = SHIFTS  # --tta: digits are shifted, never mirrored (a mirrored 2 is no 2)

    def build_model(self) -> FastMnistNet:
        return FastMnistNet(num_classes=len(self.dataset.class_names))

    def start(self, model: nn.Module, batches: DeviceBatches, lr: float) -> base.Training:
        # Adam over all weights, mean cross-entropy; nothing at step or epoch boundaries.
        return base.Training(Adam(model.parameters(), lr, betas=BETAS))
