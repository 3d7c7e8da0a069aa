"""What every recipe provides, and what a recipe that says nothing more gets.

`Recipe` builds (the net, the training batches with its `augmentation`, and through `start` one
run's `Training`) and says how it evaluates (`tta`). `Training` is that run's part the loop does
not own: the optimiser and the loss, what happens at epoch starts and after steps, and what the
recipe adds to a checkpoint beyond the weights and the run's position (`STATE`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from job.batches import Augmentation, DeviceBatches
from job.datasets import DatasetPreset
from job.evaluation import TTA


def mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy averaged over the batch: (what backward differentiates, the mean loss per
    image to report), the pair every recipe's loss returns."""
    loss = F.cross_entropy(logits, labels)
    return loss, loss


class Training:
    """One run's optimiser, loss and recipe-owned state. The loop calls `begin_epoch` before
    each epoch, `after_step` after each step and `end_run` before the final evaluation; the
    checkpoint holds `state_dict()` and a resume hands it back to `load_state_dict`."""

    # The entries state_dict() adds to a checkpoint beyond job/checkpoint.py's FORMAT (which has
    # "optimizer"), with their types: `check` refuses a checkpoint whose entry is of another.
    STATE: ClassVar[dict[str, type]] = {}

    def __init__(self, optimizer, criterion: Callable = mean_cross_entropy) -> None:
        self.optimizer = optimizer  # job.optim's Adam or SGD
        self.criterion = criterion  # (logits, labels) -> (loss to differentiate, mean to report)

    def begin_epoch(self, epoch: int) -> None:
        """Before epoch `epoch` (0-based) trains, fresh or resumed."""

    def after_step(self, step: int, progress: float) -> None:
        """After optimizer step `step` (1-based, of the run); `progress` is the fraction of the
        run's images trained so far."""

    def end_run(self) -> None:
        """After the last step, before the evaluation the run reports."""

    def state_dict(self) -> dict:
        """The checkpoint's entries this recipe owns: the optimiser's, and those of STATE."""
        return {"optimizer": self.optimizer.state_dict()}

    def check(self, state: dict) -> None:
        """ValueError (one line) unless a checkpoint's entries fit this run's parameters."""
        for key, kind in self.STATE.items():
            if key in state and not isinstance(state[key], kind):
                raise ValueError(f"malformed checkpoint ({key!r} is a {type(state[key]).__name__})")
        self.optimizer.check(state["optimizer"])

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class Recipe:
    """A net and how to train and evaluate it, for one dataset. Each recipe module defines a
    subclass named `Recipe` and a DEFAULTS literal (see job/recipes/__init__.py), and sets `tta`."""

    tta: TTA  # the views evaluation averages with --tta (job/recipes/augment.py has some)
    augmentation: Augmentation | None = None  # what --augment does to the training batches
    whole_batches = False  # an epoch serves whole global batches only (its last partial one left out)

    def __init__(self, dataset: DatasetPreset) -> None:
        self.dataset = dataset

    def build_model(self) -> torch.nn.Module:
        """The net, freshly initialised from torch's global generator (seeded by the caller)."""
        raise NotImplementedError

    def train_batches(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                      batch_size: int, *, augment: bool, seed: int, rank: int = 0,
                      world_size: int = 1) -> DeviceBatches:
        """The training split as shuffled (and, with `augment`, augmented) batches on `device`."""
        return DeviceBatches(images, labels, self.dataset, device, batch_size, shuffle=True,
                             augmentation=self.augmentation if augment else None,
                             whole_batches=self.whole_batches, seed=seed, rank=rank,
                             world_size=world_size)

    def start(self, model: torch.nn.Module, batches: DeviceBatches, lr: float) -> Training:
        """One run's Training of `model` (on its device) over `batches` at peak rate `lr`."""
        raise NotImplementedError
