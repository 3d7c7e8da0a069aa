"""The on-device batches: each rank's share of an epoch's order, resumable by position,
normalised and channels_last; a recipe's augmentation drawn per position."""

import torch

from job.batches import DeviceBatches, derived_seed
from job.datasets import preset
from job.recipes import load

CPU = torch.device("cpu")



def _batches(splits, **kwargs):
    options = dict(shuffle=True, seed=3)
    options.update(kwargs)
    return DeviceBatches(splits.train_images[:1000], splits.train_labels[:1000], preset("mnist"),
                         CPU, 64, **options)


def _indexed(n: int, **kwargs) -> DeviceBatches:
    """Batches whose labels are the images' indices, so the order itself can be checked."""
    images = torch.zeros(n, 28, 28, 1, dtype=torch.uint8)
    options = dict(shuffle=True, seed=3)
    options.update(kwargs)
    return DeviceBatches(images, torch.arange(n), preset("mnist"), CPU, 64, **options)


def epoch_indices(batches: DeviceBatches, epoch: int = 0, position: int = 0) -> list[int]:
    return torch.cat([y for _, y in batches.epoch(epoch, position)]).tolist()


def test_ranks_take_disjoint_shards_covering_the_epoch():
    shards = [epoch_indices(_indexed(1000, rank=rank, world_size=3), epoch=2) for rank in range(3)]
    assert [len(shard) for shard in shards] == [333, 333, 333]
    everything = shards[0] + shards[1] + shards[2]
    assert len(set(everything)) == 999  # each image at most once per epoch across ranks
    next_epoch = [epoch_indices(_indexed(1000, rank=r, world_size=3), epoch=3) for r in range(3)]
    assert set(everything) != set(next_epoch[0] + next_epoch[1] + next_epoch[2])


def test_order_depends_on_seed_and_epoch_only():
    first = epoch_indices(_indexed(1000))
    assert sorted(first) == list(range(1000))
    assert first != list(range(1000))
    assert epoch_indices(_indexed(1000)) == first
    assert epoch_indices(_indexed(1000), epoch=1) != first
    assert epoch_indices(_indexed(1000, seed=4)) != first
    assert epoch_indices(_indexed(1000), position=5 * 64) == first[5 * 64:]


def test_batches_are_normalised_and_channels_last(mnist):
    images = torch.cat([x for x, _ in _batches(mnist, shuffle=False).epoch(0)])
    assert images.shape == (1000, 1, 28, 28)
    assert images.is_contiguous(memory_format=torch.channels_last)
    expected = (mnist.train_images[:1000].permute(0, 3, 1, 2).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(images, expected)


def test_last_batch_is_short_not_dropped(mnist):
    sizes = [len(y) for _, y in _batches(mnist).epoch(0)]
    assert sizes == [64] * 15 + [40]


def test_the_seed_recipes_augmentation_crops_within_padding_and_flips():
    p, recipe = preset("cifar10"), load("cifar10", "seed")
    white = torch.full((256, 32, 32, 3), 255, dtype=torch.uint8)
    ramp = torch.arange(32, dtype=torch.uint8).view(1, 1, 32, 1).expand(256, 32, 32, 3) * 8
    for images in (white, ramp.contiguous()):
        batches = recipe.train_batches(images, torch.zeros(256, dtype=torch.long), CPU, 256,
                                       augment=True, seed=0)
        (augmented, _), = list(batches.epoch(0))
        raw = torch.round((augmented * torch.tensor(p.std).view(1, 3, 1, 1)
                           + torch.tensor(p.mean).view(1, 3, 1, 1)) * 255).clamp(0, 255)
        if images is white:
            zero_rows = (raw[:, 0, :, 16] == 0).sum(dim=1)  # padding shows as black strips
            assert zero_rows.max() <= 4 and (zero_rows > 0).float().mean() > 0.5
        else:
            # Along a row the ramp rises (kept) or falls (flipped); both must occur.
            middle = raw[:, 0, 16, 8:24]
            rising = (middle.diff() >= 0).all(dim=1)
            falling = (middle.diff() <= 0).all(dim=1)
            assert (rising | falling).all()
            assert 0.3 < rising.float().mean() < 0.7
    again = recipe.train_batches(white, torch.zeros(256, dtype=torch.long), CPU, 256,
                                 augment=True, seed=0)
    first, = [x for x, _ in again.epoch(0)]
    second, = [x for x, _ in again.epoch(0)]
    assert torch.equal(first, second)  # a pure function of (seed, epoch, position)


def test_evaluation_shards_cover_the_split_once(mnist):
    p = preset("mnist")
    total = 0
    for rank in range(3):
        shard = DeviceBatches(mnist.test_images, mnist.test_labels, p, CPU, 1000, shuffle=False,
                              rank=rank, world_size=3)
        total += sum(len(y) for _, y in shard.epoch(0))
    assert total == 10000


def test_derived_seed_is_stable():
    assert derived_seed(0, "shuffle", 1) == derived_seed(0, "shuffle", 1)
    assert derived_seed(0, "shuffle", 1) != derived_seed(0, "shuffle", 2)
    assert 0 <= derived_seed(1, 2, 3) < 2**63
    # A blake2b digest, not hash(): the same in every process (no per-process hash salt).
    assert derived_seed(0, 0, 0, 0) == 5854343820274218872
