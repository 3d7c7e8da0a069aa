"""One split on the training device as uint8, served as shuffled, normalised batches made with
batched tensor ops on that device, and resumable at any position of an epoch's order. No PIL,
no DataLoader workers.

What a training batch's images go through before they are normalised (crops, flips) is the
recipe's `Augmentation` (job/recipes/): this module draws the order, never the augmentation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import torch

from job.datasets import DatasetPreset


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of its parts (seed, epoch, step, rank, ...)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Augmentation(Protocol):
    """A recipe's augmentation of its training batches, drawn per permutation position: an image
    is augmented the same way at any batch size, world size or resume point."""

    def draw(self, batches: DeviceBatches, epoch: int) -> torch.Tensor:
        """K × N on the batches' device: what each position of `epoch`'s permutation gets (crop
        offsets, a flip, ...), a pure function of the run's seed and the epoch."""
        ...

    def apply(self, images: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        """A batch of N×H×W×C uint8 images, augmented by the K × N draws of its positions."""
        ...


class DeviceBatches:
    """One split held on the device as uint8; yields (normalised float images, labels).

    Training epochs: the epoch's order is a permutation drawn from (seed, epoch) alone, and the
    run walks it front to back in global batches of batch_size × world_size, rank r taking
    every world_size-th image from position r (as DistributedSampler does). So a step always
    consumes a prefix of the permutation, and where a run stands in its epoch is one number,
    the count of permutation positions consumed: a resume with another batch size or world
    size starts at that position, and each image is still used exactly once per epoch. At the
    end, the last `(N - position) % world_size` positions sit the epoch out (drop_last); with
    `whole_batches`, every position past the last whole global batch does.
    An `augmentation` is drawn per permutation position (see Augmentation).

    Evaluation (shuffle=False): rank r takes images r, r + world_size, ... in order.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, p: DatasetPreset, device: torch.device,
        batch_size: int, *, shuffle: bool, augmentation: Augmentation | None = None,
        whole_batches: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
    ) -> None:
        self.images = images.to(device)  # N×H×W×C uint8
        self.labels = labels.to(device)
        self.device = device
        self.batch_size = batch_size
        self.shuffle, self.augmentation, self.seed = shuffle, augmentation, seed
        self.whole_batches = whole_batches
        self.rank, self.world_size = rank, world_size
        # x_normalised = (x_uint8 / 255 - mean) / std, folded into one multiply-add
        std = torch.tensor(p.std, device=device).view(1, -1, 1, 1)
        mean = torch.tensor(p.mean, device=device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -mean / std
        self.record_to: str | None = None  # append "epoch: indices" per batch to <this>.rank<r>
        self.per_rank = self.remaining(0) // world_size if shuffle else len(
            range(rank, len(self.images), world_size))  # evaluation shards may differ by one

    def __len__(self) -> int:
        """Batches per whole epoch on this rank."""
        return -(-self.per_rank // self.batch_size)

    def remaining(self, position: int) -> int:
        """Images (all ranks) a training epoch still serves after `position` of its order."""
        served = len(self.images)
        if self.whole_batches:
            global_batch = self.batch_size * self.world_size
            served = served // global_batch * global_batch
        return max(served - position, 0) // self.world_size * self.world_size

    def steps(self, position: int) -> int:
        """Steps a training epoch takes from `position` to its end."""
        return -(-self.remaining(position) // (self.batch_size * self.world_size))

    def order(self, epoch: int, position: int = 0) -> torch.Tensor:
        """Dataset indices this rank serves in `epoch` from `position` on, in serving order."""
        if not self.shuffle:
            return torch.arange(self.rank, len(self.images), self.world_size, device=self.device)
        return self.permutation(epoch)[self._positions(position)].to(self.device)

    def permutation(self, epoch: int) -> torch.Tensor:
        """`epoch`'s order of the whole split (on the CPU): dataset index at each position."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "shuffle", epoch))
        return torch.randperm(len(self.images), generator=generator)

    def _positions(self, position: int) -> torch.Tensor:
        """This rank's permutation positions from `position` on: every world_size-th one."""
        end = position + self.remaining(position)
        return torch.arange(position + self.rank, end, self.world_size)

    def epoch(self, epoch: int, position: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from permutation `position` on (0: the whole epoch)."""
        order = self.order(epoch, position)
        if self.augmentation:
            drawn = self.augmentation.draw(self, epoch)[:, self._positions(position).to(self.device)]
        for start in range(0, len(order), self.batch_size):
            index = order[start: start + self.batch_size]
            if self.record_to:
                with open(f"{self.record_to}.rank{self.rank}", "a") as record:
                    record.write(f"{epoch}: {' '.join(map(str, index.tolist()))}\n")
            images = self.images[index]
            if self.augmentation:
                images = self.augmentation.apply(images, drawn[:, start: start + self.batch_size])
            # N×H×W×C viewed as N×C×H×W is a channels_last tensor: no copy, and the float ops
            # below keep that memory format for the convolutions.
            images = images.permute(0, 3, 1, 2).float().mul_(self.scale).add_(self.shift)
            yield images, self.labels[index]
