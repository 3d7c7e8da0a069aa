"""Image operations that several recipes build their augmentation and test-time views from:
no recipe's policy, only the batched tensor ops it is made of.

A recipe's `Augmentation` (job/batches.py) draws its parameters with `epoch_generator` and
`random_crops` per permutation position and applies them with `crop_and_flip`, one gather per
batch; its `tta` is one of the TTA view sets below, or its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from job.batches import DeviceBatches, derived_seed
from job.evaluation import TTA

# ----------------------------------------------------------------------------------------------
# training batches


def epoch_generator(batches: DeviceBatches, epoch: int) -> torch.Generator:
    """The generator of `epoch`'s augmentation draws, on the batches' device: a pure function of
    the run's seed and the epoch."""
    return torch.Generator(device=batches.device).manual_seed(
        derived_seed(batches.seed, "augment", epoch))


def random_crops(batches: DeviceBatches, pad: int, generator: torch.Generator) -> torch.Tensor:
    """2 × N: a vertical and a horizontal crop offset (0 to 2·pad) per permutation position."""
    return torch.randint(0, 2 * pad + 1, (2, len(batches.images)), device=batches.device,
                         generator=generator)


def reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside 0..size-1 mirrored into it, as reflect padding does (-1 → 1, size → size-2)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def crop_and_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                  pad: int, reflected: bool) -> torch.Tensor:
    """Each N×H×W×C image's crop at offset (dy, dx) of it padded by `pad` pixels (zeros, or
    `reflected`), mirrored where flip is 1: one gather, the padding done on the indices."""
    n, height, width, _ = images.shape
    rows = dy.view(n, 1) - pad + torch.arange(height, device=images.device)
    columns = torch.arange(width, device=images.device)
    columns = dx.view(n, 1) - pad + torch.where(flip.view(n, 1).bool(), columns.flip(0), columns)
    if reflected:
        rows, columns = reflect(rows, height), reflect(columns, width)
    else:  # zeros: a padded copy, indexed past its border
        images = F.pad(images, (0, 0, pad, pad, pad, pad))
        rows, columns = rows + pad, columns + pad
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    return images[batch, rows.view(n, height, 1), columns.view(n, 1, width)]


# ----------------------------------------------------------------------------------------------
# test-time views


def mirror_and_shifts(images: torch.Tensor) -> list[torch.Tensor]:
    """airbench94's 6 views of N×C×H×W images: identity, mirror, shifted one pixel up-left
    (reflect-padded), its mirror, shifted down-right, its mirror."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., 2:, 2:], padded[..., : height, : width]
    return [view for image in (images, up_left, down_right) for view in (image, image.flip(-1))]


MIRROR_AND_SHIFTS = TTA(mirror_and_shifts, (0.25, 0.25, 0.125, 0.125, 0.125, 0.125),
                        "identity, mirror, up-left, its mirror, down-right, its mirror")


def shifts(images: torch.Tensor) -> list[torch.Tensor]:
    """mirror_and_shifts' unmirrored views: identity, up-left, down-right (for images, such as
    digits, whose mirror image is another thing)."""
    return mirror_and_shifts(images)[::2]


SHIFTS = TTA(shifts, (0.5, 0.25, 0.25), "identity, up-left, down-right")
