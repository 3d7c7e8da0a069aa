"""Evaluation over a whole split: loss, accuracy, confusion matrix and a few misclassified
images; and test-time augmentation. One function, used after every epoch of training and by
`cnn-job evaluate`; the tracker only consumes its result.
"""

from __future__ import annotations

from collections.abc import Callable
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


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: views of a batch, each passed through the net, and the weight of
    each view's logits in their sum. A recipe says which views suit its data."""

    views: Callable[[torch.Tensor], list[torch.Tensor]]  # N×C×H×W -> the views, in weights' order
    weights: tuple[float, ...]
    description: str  # the views in words, for an export's metadata


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


def tta_logits(model, images: torch.Tensor, tta: TTA) -> torch.Tensor:
    """The weighted sum (in float32) of the model's logits over the views, a forward pass each:
    the memory of one batch, not of all views at once."""
    logits = 0
    for weight, view in zip(tta.weights, tta.views(images)):
        logits = logits + weight * model(view).float()
    return logits


class WithTTA(torch.nn.Module):
    """A net whose logits are its test-time augmented ones (what `export` writes for TTA)."""

    def __init__(self, model: torch.nn.Module, tta: TTA) -> None:
        super().__init__()
        self.model, self.tta = model, tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.model, images, self.tta)


@torch.no_grad()
def evaluate(model, batches: DeviceBatches, d: Dist, autocast, num_classes: int,
             tta: TTA | None = None) -> Evaluation:
    """Loss, accuracy and confusion matrix over the whole split (sharded across ranks, sums
    all-reduced), and a few misclassified images from rank 0's share for the dashboard; with
    a `tta`, of its test-time augmented logits."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=d.device)  # Σ loss, images
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=d.device)
    order, misclassified = batches.order(0), []
    for index, (images, labels) in enumerate(batches.epoch(0)):
        with autocast():
            logits = tta_logits(model, images, tta) if tta else model(images)
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
                      misclassified, tta is not None)
