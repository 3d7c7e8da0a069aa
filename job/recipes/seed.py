"""The seed CNNs, trained with Adam

Conv-ReLU-maxpool blocks, then two fully connected layers, as the project's origin wrote them:
CIFAR-10 conv 3→32→64→128 (kernel 3, padding 1), a 2×2 max-pool after each conv, FC
2048→128→10; MNIST conv 1→32→64, FC 3136→128→10. Cross-entropy, Adam at 1e-3, batch 64, 5
epochs (~99% on MNIST, ~74% on CIFAR-10). `--augment` adds a random 4-px-padded crop and a flip
on CIFAR-10; `--tta` evaluates the final weights on 6 views (mirrored and shifted; on MNIST
the 3 shifted ones: a mirrored digit is no digit).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from job.batches import DeviceBatches
from job.evaluation import TTA
from job.optim import Adam
from job.recipes import base
from job.recipes.augment import (
    MIRROR_AND_SHIFTS,
    SHIFTS,
    crop_and_flip,
    epoch_generator,
    random_crops,
)

# ----------------------------------------------------------------------------------------------
# defaults (a plain literal: --help reads it without importing this module)

DEFAULTS = {"epochs": 5, "batch_size": 64, "lr": 1e-3, "lr_schedule": "linear",
            "augment": False, "tta": False}

CONV_WIDTHS = {"mnist": (32, 64), "cifar10": (32, 64, 128)}
HIDDEN = 128
CROP_PAD = 4  # pixels of zero padding for the random crop, as torchvision's RandomCrop(32, 4)

# ----------------------------------------------------------------------------------------------
# the net


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # The seed's conv → ReLU → 2×2 max-pool, with pool and ReLU swapped: max and ReLU commute
    # exactly (same outputs, same gradients but for ties between equal values), and ReLU and
    # its backward then touch 4× fewer elements: +17-23% images/s on CPU. No parameters move,
    # so the state_dict is the seed's.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.MaxPool2d(2),
        nn.ReLU(inplace=True),
    )


class SeedCNN(nn.Module):
    """CIFAR-10: conv 3→32→64→128, FC 2048→128→10. MNIST: conv 1→32→64, FC 3136→128→10."""

    def __init__(
        self,
        in_channels: int,
        conv_widths: tuple[int, ...],
        image_size: int,
        hidden: int = HIDDEN,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        widths = (in_channels, *conv_widths)
        self.features = nn.Sequential(
            *(_conv_block(c_in, c_out) for c_in, c_out in itertools.pairwise(widths))
        )
        side = image_size // 2 ** len(conv_widths)  # each block halves the side
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(conv_widths[-1] * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, images):
        return self.classifier(self.features(images))


# ----------------------------------------------------------------------------------------------
# the augmentation (--augment)


class PaddedCropAndFlip:
    """A random crop of the image zero-padded by CROP_PAD pixels and a random horizontal flip, as
    torchvision's RandomCrop(32, 4) and RandomHorizontalFlip: each drawn per permutation
    position from (seed, epoch)."""

    def draw(self, batches: DeviceBatches, epoch: int) -> torch.Tensor:
        """3 × N: vertical and horizontal crop offsets and a flip bit per permutation position."""
        generator = epoch_generator(batches, epoch)
        crops = random_crops(batches, CROP_PAD, generator)
        flips = torch.randint(0, 2, (1, len(batches.images)), device=batches.device,
                              generator=generator)
        return torch.cat([crops, flips])

    def apply(self, images: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        return crop_and_flip(images, *drawn, pad=CROP_PAD, reflected=False)


AUGMENTATION = PaddedCropAndFlip()

# ----------------------------------------------------------------------------------------------
# the recipe


class Recipe(base.Recipe):
    augmentation = AUGMENTATION

    @property
    def tta(self) -> TTA:
        """Mirrored views only where a mirrored image is still of its class (not a digit: a
        mirrored 2 is no 2)."""
        return MIRROR_AND_SHIFTS if self.dataset.augmentable else SHIFTS

    def build_model(self) -> SeedCNN:
        p = self.dataset
        return SeedCNN(p.channels, CONV_WIDTHS[p.name], p.image_size,
                       num_classes=len(p.class_names))

    def start(self, model: nn.Module, batches: DeviceBatches, lr: float) -> base.Training:
        # Adam over all weights, mean cross-entropy; nothing at step or epoch boundaries.
        return base.Training(Adam(model.parameters(), lr))
