"""Evaluation over a whole split: loss, accuracy, confusion matrix and a few misclassified
images. One function, used after every epoch of training; the tracker only consumes its result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from job import distributed
from job.data import DeviceBatches
from job.distributed import Dist
from job.errors import JobError

MISCLASSIFIED_PANEL = 16  # test images kept per evaluation with their true and predicted labels


@dataclass
class Evaluation:
    """The test split after an epoch: what the loop prints and the dashboard shows."""

    loss: float
    accuracy: float
    confusion: torch.Tensor  # classes × classes counts, rows = true label (all ranks)
    misclassified: list[tuple[torch.Tensor, int, int]]  # (H×W×C uint8 image, true, predicted)
    tta: bool = False  # of the test-time augmented logits

    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diagonal() / totals).tolist()


# Test-time augmentation (airbench94's): the image and its mirror, and the image shifted by one
# pixel up-left and down-right (reflect-padded), each with its mirror; logits weighted.
TTA_WEIGHTS = (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)


def tta_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 6 views of N×C×H×W images, in TTA_WEIGHTS' order: identity, mirror, shifted up-left,
    its mirror, shifted down-right, its mirror."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., 2:, 2:], padded[..., : height, : width]
    return [view for image in (images, up_left, down_right) for view in (image, image.flip(-1))]


def tta_logits(model, images: torch.Tensor) -> torch.Tensor:
    """The weighted sum (in float32) of the model's logits over the 6 views, a forward pass
    each: the memory of one batch, not of six."""
    logits = 0
    for weight, view in zip(TTA_WEIGHTS, tta_views(images)):
        logits = logits + weight * model(view).float()
    return logits


class WithTTA(torch.nn.Module):
    """A net whose logits are its test-time augmented ones (what `export` writes for TTA)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.model, images)


@torch.no_grad()
def evaluate(model, batches: DeviceBatches, d: Dist, autocast, num_classes: int,
             tta: bool = False) -> Evaluation:
    """Loss, accuracy and confusion matrix over the whole split (sharded across ranks, sums
    all-reduced), and a few misclassified images from rank 0's share for the dashboard; with
    `tta`, of the test-time augmented logits."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=d.device)  # Σ loss, images
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=d.device)
    order, misclassified = batches.order(0), []
    for index, (images, labels) in enumerate(batches.epoch(0)):
        with autocast():
            logits = tta_logits(model, images) if tta else model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += labels.numel()
        predicted = logits.argmax(dim=1)
        confusion += torch.bincount(labels * num_classes + predicted, minlength=confusion.numel())
        if d.is_main and len(misclassified) < MISCLASSIFIED_PANEL:
            wrong = (predicted != labels).nonzero().flatten()[: MISCLASSIFIED_PANEL - len(misclassified)]
            positions = order[index * batches.batch_size + wrong].tolist()
            misclassified += [(batches.images[p].cpu(), int(labels[w]), int(predicted[w]))
                              for p, w in zip(positions, wrong.tolist())]
    loss_sum, count = distributed.all_reduce_sum(d, totals).tolist()
    confusion = distributed.all_reduce_sum(d, confusion).view(num_classes, num_classes).cpu()
    model.train()
    if not count:  # every rank knows it (summed): they all stop, none waits in a collective
        raise JobError("the test split holds no images: there is nothing to evaluate")
    return Evaluation(loss_sum / count, confusion.diagonal().sum().item() / count, confusion,
                      misclassified, tta)
