"""The CNNs: the seed nets (conv-ReLU-maxpool blocks, then two fully connected layers) and the
fast net (airbench94's, CIFAR-10). No I/O here."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from job.config import preset


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
        hidden: int = 128,
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


def build_model(dataset: str, net: str = "seed") -> nn.Module:
    p = preset(dataset)
    if net == "fast":
        return FastNet(num_classes=len(p.class_names))
    return SeedCNN(p.channels, p.conv_widths, p.image_size, num_classes=len(p.class_names))


# ----------------------------------------------------------------------------------------------
# the fast net: airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU",
# arXiv 2404.00498), written from the paper's description

WHITENING_PATCH = 2  # pixels a side: 2×2 patches of 3 channels, 12 values
WHITENING_EPS = 5e-4  # added to each eigenvalue: the patches' smallest ones are noise
FAST_WIDTHS = (64, 256, 256)
LOGIT_SCALE = 1 / 9  # the head's output scale, as published


class FastBatchNorm(nn.BatchNorm2d):
    """BatchNorm with the scale frozen at 1 (only the bias learns), eps 1e-12 and PyTorch momentum
    0.4: the running statistics follow the last few batches of a 10-epoch run."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class FastBlock(nn.Sequential):
    """conv 3×3 → max-pool 2 → BN → GELU → conv 3×3 → BN → GELU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            FastBatchNorm(out_channels),
            nn.GELU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            FastBatchNorm(out_channels),
            nn.GELU(),
        )


class FastNet(nn.Module):
    """Whitening conv 2×2 3→24 (frozen filters from the data, see init_whitening) → GELU → blocks
    64, 256, 256 → max-pool 3 → linear 256→10 without bias, × 1/9. 1.97 M weights; 32×32 input
    becomes 31×31 after the whitening conv, then 15, 7, 3 and 1 after the pools."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = FAST_WIDTHS) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 2 * 3 * WHITENING_PATCH**2, WHITENING_PATCH, bias=True)
        self.whiten.weight.requires_grad_(False)  # set by init_whitening, never trained
        channels = (self.whiten.out_channels, *widths)
        self.blocks = nn.Sequential(*(FastBlock(c_in, c_out)
                                      for c_in, c_out in itertools.pairwise(channels)))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        for module in self.blocks.modules():
            if isinstance(module, nn.Conv2d):
                dirac_init(module.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.blocks(F.gelu(self.whiten(images)))
        features = F.max_pool2d(features, 3).flatten(1)
        return self.head(features) * LOGIT_SCALE


@torch.no_grad()
def dirac_init(weight: torch.Tensor) -> None:
    """The first in_channels filters of a conv pass their input channel through unchanged (a
    square conv starts as the identity); the rest keep their default init. The paper credits
    this with most of its gain after the whitening."""
    torch.nn.init.dirac_(weight[: weight.shape[1]])


@torch.no_grad()
def whitening_filters(images: torch.Tensor, eps: float = WHITENING_EPS) -> torch.Tensor:
    """24 filters 3×2×2 that whiten the 2×2 patches of `images` (N×3×H×W, normalised): each
    eigenvector of the patches' uncentred covariance scaled by 1/sqrt(eigenvalue + eps), largest
    eigenvalue first, then their negations. On the images' device; deterministic (each
    eigenvector's sign is fixed: its largest component positive)."""
    channels, k = images.shape[1], WHITENING_PATCH
    covariance = torch.zeros(channels * k * k, channels * k * k, dtype=torch.float64,
                             device=images.device)
    count = 0
    # In float64 (TF32 or float32 sums over millions of patches blur the smallest eigenvalues,
    # which the filters scale up most), 500 images at a time to bound the memory.
    for chunk in images.split(500):
        patches = chunk.double().unfold(2, k, 1).unfold(3, k, 1)  # n×C×H'×W'×k×k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * k * k)  # (c, y, x)
        covariance += patches.T @ patches
        count += len(patches)
    covariance /= count
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    largest = eigenvectors.abs().argmax(dim=0)
    signs = eigenvectors[largest, torch.arange(len(largest), device=images.device)].sign()
    filters = (eigenvectors * signs).T / (eigenvalues.clamp(min=0) + eps).sqrt().view(-1, 1)
    filters = filters.view(-1, channels, k, k).float()
    return torch.cat([filters, -filters])


@torch.no_grad()
def init_whitening(model: FastNet, images: torch.Tensor) -> None:
    """Set the whitening conv's filters from `images` (the first 5,000 normalised training images
    in the recipe). The bias keeps its default init and trains for the first epochs only (see
    optim.fast_sgd)."""
    model.whiten.weight.copy_(whitening_filters(images))
