"""airbench94: 94.01% published (original CIFAR-10), 90.5-90.7% measured on a JPEG-derived copy

A whitened, BatchNormed CNN trained with Nesterov SGD and lookahead, evaluated with TTA.

Written from the paper's description (Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a
Single GPU", arXiv 2404.00498), top to bottom: the hyperparameters, the net and its whitening
filters, the augmentation and the test-time views, the optimiser, the lookahead, the loss, and
the recipe that wires them for the loop. Its 9.9 epochs are rounded up to 10 (480 steps, not 476),
so that every epoch ends in an evaluation and a checkpoint, as the job's guarantees need.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from job.batches import DeviceBatches, derived_seed
from job.errors import JobError
from job.optim import SGD
from job.recipes import base
from job.recipes.augment import (
    MIRROR_AND_SHIFTS,
    crop_and_flip,
    epoch_generator,
    random_crops,
)

# ----------------------------------------------------------------------------------------------
# hyperparameters

# DEFAULTS is a plain literal: --help reads it without importing this module. lr is SGD's for
# the loss summed over the batch: airbench94's 11.5 per 1024 images divided by
# 1024 · (1 + 1 / (1 - MOMENTUM)), the scale of Nesterov's steps (tests/test_fast.py checks it).
DEFAULTS = {"epochs": 10, "batch_size": 1024, "lr": 0.0014648437500000002,
            "lr_schedule": "triangle", "augment": True, "tta": True}

WIDTHS = (64, 256, 256)  # the three blocks' channels
WHITENING_PATCH = 2  # pixels a side: 2×2 patches of 3 channels, 12 values
WHITENING_EPS = 5e-4  # added to each eigenvalue: the patches' smallest ones are noise
WHITENING_IMAGES = 5000  # the whitening filters come from the first this many training images
LOGIT_SCALE = 1 / 9  # the head's output scale, as published
CROP_PAD = 2  # pixels of reflect padding for the random crop
MOMENTUM = 0.85
WEIGHT_DECAY_PER_1024 = 0.0153  # decoupled: the decay per step of a batch of 1024 at the peak lr
BN_BIAS_LR_SCALE = 64.0  # the BN biases' lr is this times the rest's (same decay per step)
WHITENING_BIAS_EPOCHS = 3  # the whitening conv's bias trains in these first epochs, then freezes
LABEL_SMOOTHING = 0.2

# ----------------------------------------------------------------------------------------------
# the net


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

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = WIDTHS) -> None:
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
    fast_sgd)."""
    model.whiten.weight.copy_(whitening_filters(images))


# ----------------------------------------------------------------------------------------------
# the augmentation, and the test-time views


class AlternatingFlipAndCrop:
    """airbench94's augmentation: a random crop of the image reflect-padded by CROP_PAD pixels,
    and the alternating flip: in epoch 0 a random half of the images (drawn from the seed) is
    mirrored, and from then on each image's flip alternates from one epoch to the next, so every
    image is seen both ways in any two consecutive epochs. Crops are drawn per permutation
    position from (seed, epoch), flips per image from the seed: a resume at any batch size or
    world size gets the same ones."""

    def flips(self, batches: DeviceBatches, epoch: int) -> torch.Tensor:
        """1 where image i (dataset index) is mirrored in `epoch`, 0 where it is not."""
        generator = torch.Generator(device=batches.device).manual_seed(
            derived_seed(batches.seed, "flip"))
        first = torch.randint(0, 2, (len(batches.images),), device=batches.device,
                              generator=generator)
        return first ^ (epoch % 2)

    def draw(self, batches: DeviceBatches, epoch: int) -> torch.Tensor:
        """3 × N: crop offsets per permutation position, and the flip of the image there."""
        crops = random_crops(batches, CROP_PAD, epoch_generator(batches, epoch))
        flips = self.flips(batches, epoch)[batches.permutation(epoch).to(batches.device)]
        return torch.cat([crops, flips.view(1, -1)])

    def apply(self, images: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        return crop_and_flip(images, *drawn, pad=CROP_PAD, reflected=True)


AUGMENTATION = AlternatingFlipAndCrop()
TTA_VIEWS = MIRROR_AND_SHIFTS  # identity and mirror at 1/4 each; 1 px shifts of both at 1/8


# ----------------------------------------------------------------------------------------------
# the optimiser: SGD with Nesterov momentum and decoupled weight decay, in groups


def fast_sgd(model: torch.nn.Module, lr: float, global_batch: int) -> SGD:
    """airbench94's SGD: the BN biases at 64× the rate; the whitening conv's bias apart (frozen
    after WHITENING_BIAS_EPOCHS); every other trainable parameter at the rate. Decay is
    decoupled from the rate: WEIGHT_DECAY_PER_1024 · global_batch / kilostep per step at the
    peak for every group, handed to SGD as that divided by the group's rate."""
    kilostep = 1024 * (1 + 1 / (1 - MOMENTUM))  # lr → the size of a Nesterov step
    decay_per_step = WEIGHT_DECAY_PER_1024 * global_batch / kilostep
    bn_biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    whitening_bias = [model.whiten.bias]
    taken = {id(p) for p in bn_biases + whitening_bias}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [("bn_biases", bn_biases, BN_BIAS_LR_SCALE), ("whitening_bias", whitening_bias, 1.0),
              ("weights", others, 1.0)]
    return SGD([{"name": name, "params": params, "lr_scale": scale,
                 "weight_decay": decay_per_step / (lr * scale)} for name, params, scale in groups],
               lr, MOMENTUM)


# ----------------------------------------------------------------------------------------------
# lookahead


class Lookahead:
    """Every EVERY_STEPS steps, an EMA copy of the net's state (weights and BN statistics) moves
    toward the live one with decay DECAY · progress³, and the live net is reset to it; the
    run's final weights are the EMA's (finish)."""

    EVERY_STEPS = 5
    DECAY = 0.95**5

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ema = {name: t.detach().clone() for name, t in model.state_dict().items()
                    if t.is_floating_point()}

    def decay_at(self, progress: float) -> float:
        """progress: the fraction of the run's images trained after this step."""
        return self.DECAY * min(progress, 1.0) ** 3

    def after_step(self, step: int, progress: float) -> None:
        if step % self.EVERY_STEPS == 0:
            self.update(self.decay_at(progress))

    @torch.no_grad()
    def update(self, decay: float) -> None:
        live = self.model.state_dict()
        ema, current = list(self.ema.values()), [live[name] for name in self.ema]
        torch._foreach_lerp_(ema, current, 1 - decay)  # ema = decay · ema + (1 - decay) · live
        torch._foreach_copy_(current, ema)

    def finish(self) -> None:
        """The live net becomes the EMA (decay 1: the EMA does not move)."""
        self.update(1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.ema)

    def check(self, state_dict: dict) -> None:
        if {k: getattr(v, "shape", None) for k, v in state_dict.items()} != {
                k: v.shape for k, v in self.ema.items()}:
            raise ValueError("its lookahead copy does not fit the net")

    def load_state_dict(self, state_dict: dict) -> None:
        self.check(state_dict)
        for name, tensor in self.ema.items():
            tensor.copy_(state_dict[name])


# ----------------------------------------------------------------------------------------------
# the loss


def summed_smoothed_cross_entropy(world_size: int):
    """Cross-entropy with label smoothing 0.2, summed over the batch (the lr is for the sum),
    times the world size, since DDP averages the ranks' gradients: the gradient is the global
    batch's sum at any world size. It reports the mean per image."""
    def criterion(logits: torch.Tensor, labels: torch.Tensor):
        total = F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING, reduction="sum")
        return total * world_size, total.detach() / len(labels)

    return criterion


# ----------------------------------------------------------------------------------------------
# the recipe


class FastTraining(base.Training):
    """SGD and the loss, the whitening bias frozen after its epochs, the lookahead after every
    step and as the final weights; the checkpoint carries the lookahead's EMA copy."""

    def __init__(self, optimizer: SGD, criterion, lookahead: Lookahead) -> None:
        super().__init__(optimizer, criterion)
        self.lookahead = lookahead

    def begin_epoch(self, epoch: int) -> None:
        self.optimizer.set_lr_scale("whitening_bias", epoch < WHITENING_BIAS_EPOCHS)

    def after_step(self, step: int, progress: float) -> None:
        self.lookahead.after_step(step, progress)

    def end_run(self) -> None:
        self.lookahead.finish()  # the run's final weights are the EMA's, BN statistics too

    STATE: ClassVar[dict[str, type]] = {"lookahead": dict}  # the EMA copy of the float state

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lookahead": self.lookahead.state_dict()}

    def check(self, state: dict) -> None:
        super().check(state)
        self.lookahead.check(state.get("lookahead", {}))

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lookahead.load_state_dict(state["lookahead"])


class Recipe(base.Recipe):
    augmentation = AUGMENTATION
    tta = TTA_VIEWS
    whole_batches = True  # as airbench94: an epoch's last partial global batch is left out

    def build_model(self) -> FastNet:
        return FastNet(num_classes=len(self.dataset.class_names))

    def start(self, model: FastNet, batches: DeviceBatches, lr: float) -> FastTraining:
        """The whitening filters (from the first normalised training images, on the device),
        SGD, lookahead and loss, for the batches' batch size and world size."""
        batch_size, world_size = batches.batch_size, batches.world_size
        if not batches.remaining(0):
            raise JobError(f"--batch-size {batch_size} × {world_size} processes is more than the "
                           f"{len(batches.images)} training images: --net fast drops an epoch's "
                           "last partial batch, so no step would run; lower --batch-size")
        first = batches.images[:WHITENING_IMAGES].permute(0, 3, 1, 2).float()
        init_whitening(model, first * batches.scale + batches.shift)
        return FastTraining(fast_sgd(model, lr, batch_size * world_size),
                            summed_smoothed_cross_entropy(world_size), Lookahead(model))
