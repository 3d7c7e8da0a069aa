"""What each dataset is: its archives and where they are published, its splits' sizes, its
images' shape, normalisation and class names. Plain data, no torch: the CLI reads it to answer
at once."""

from __future__ import annotations

from dataclasses import dataclass

from job.errors import JobError


@dataclass(frozen=True)
class Archive:
    """One archive file of a dataset, as the public mirrors publish it."""

    name: str
    md5: str  # of the upstream file; a user's own mirror may differ (see fetch_archives)
    holds_test: bool = True  # the test split is in it (what `evaluate --data-uri` reads)


# How a dataset's archives are written, and so parsed (job/data.py): gzipped IDX files of
# unsigned bytes, one per split and kind; or a gzipped tarball of pickled python batches.
IDX, CIFAR_PYTHON = "idx", "cifar-python"


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    archives: tuple[Archive, ...]
    archive_format: str  # IDX or CIFAR_PYTHON
    mirrors: tuple[str, ...]  # base URLs holding the archives by name, tried in order
    split_sizes: tuple[int, int]  # images in the train and test splits, as published
    channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    augmentable: bool  # random crop + flip make sense (not for digits)


# Mirrors and checksums are the ones torchvision uses.
PRESETS: dict[str, DatasetPreset] = {
    "mnist": DatasetPreset(
        name="mnist",
        archives=(
            Archive("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", False),
            Archive("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcc1ac7ed4f", False),
            Archive("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            Archive("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        archive_format=IDX,
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist",
            "http://yann.lecun.com/exdb/mnist",
        ),
        split_sizes=(60000, 10000),
        channels=1,
        image_size=28,
        mean=(0.1307,),
        std=(0.3081,),
        class_names=tuple(str(digit) for digit in range(10)),
        augmentable=False,
    ),
    "cifar10": DatasetPreset(
        name="cifar10",
        archives=(Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        archive_format=CIFAR_PYTHON,
        mirrors=("https://www.cs.toronto.edu/~kriz",),
        split_sizes=(50000, 10000),
        channels=3,
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        class_names=(
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ),
        augmentable=True,
    ),
}

DATASETS = tuple(PRESETS)


def preset(dataset: str) -> DatasetPreset:
    try:
        return PRESETS[dataset]
    except KeyError:
        raise JobError(
            f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}"
        ) from None
