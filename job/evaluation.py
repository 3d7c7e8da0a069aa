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

    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diagonal() / totals).tolist()


@torch.no_grad()
def evaluate(model, batches: DeviceBatches, d: Dist, autocast, num_classes: int) -> Evaluation:
    """Loss, accuracy and confusion matrix over the whole split (sharded across ranks, sums
    all-reduced), and a few misclassified images from rank 0's share for the dashboard."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=d.device)  # Σ loss, images
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=d.device)
    order, misclassified = batches.order(0), []
    for index, (images, labels) in enumerate(batches.epoch(0)):
        with autocast():
            logits = model(images)
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
                      misclassified)
