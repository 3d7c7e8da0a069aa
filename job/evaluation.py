"""Evaluation over a whole split: loss, accuracy, confusion matrix and a few misclassified
images; and test-time augmentation, with the views a recipe gives (job/recipes/). One function,
used after every epoch of training and by `cnn-job evaluate`; the tracker only consumes its
result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from job import distributed
from job.batches import DeviceBatches
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
