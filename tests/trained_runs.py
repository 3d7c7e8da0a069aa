"""Short real training runs for the after-training tests (evaluate, predict, export), each trained
once per test session and shared, and test-split images written the way a user would have them."""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_RUNS: dict[str, Run] = {}


@dataclass(frozen=True)
class Run:
    folder: Path  # the checkpoint folder (`latest` names the final checkpoint)
    checkpoint: Path  # the final checkpoint file
    summary: dict  # what training reported


def trained_run(dataset: str, tmp_path_factory, data_dir: Path) -> Run:
    """One epoch on 2,000 training images, evaluated on the whole test split, on CPU."""
    if dataset not in _RUNS:
        from job.config import TrainConfig
        from job.train import train

        folder = tmp_path_factory.mktemp(f"run-{dataset}")
        summary = train(TrainConfig(dataset=dataset, data_uri=str(data_dir), epochs=1,
                                    limit_train=2000, device="cpu", checkpoint_uri=str(folder / "ckpt"),
                                    cache_dir=folder / "cache"))
        _RUNS[dataset] = Run(folder / "ckpt", Path(summary["checkpoint"]), summary)
    return _RUNS[dataset]


def write_pngs(images, folder: Path) -> list[Path]:
    """Test-split images (N×H×W×C uint8) as PNG files, one per image, with Pillow."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images.numpy()):
        path = folder / f"{index:04d}.png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        paths.append(path)
    return paths


def exported_net(checkpoints: str, output: Path, dataset: str, net: str):
    """`cnn-job export` of `checkpoints` as ONNX to `output`, and the PyTorch net of the
    checkpoint it exported (`latest`), in eval mode: the two to compare."""
    import torch

    from job.recipes import load
    from tests.conftest import run_cli

    result = run_cli("export", checkpoints, "--format", "onnx", "--output", str(output))
    assert result.returncode == 0, result.stderr
    model = load(dataset, net).build_model().eval()
    latest = Path(checkpoints) / (Path(checkpoints) / "latest").read_text().strip()
    model.load_state_dict(torch.load(latest, weights_only=True)["model"])
    return model


def onnx_logits(path: Path, images) -> np.ndarray:
    """The logits the exported ONNX file at `path` computes for `images` (N×C×H×W float32)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    return logits


def assert_same_logits(got: np.ndarray, expected) -> None:
    """An export's logits against PyTorch's (a tensor): within 1e-4, the same class each."""
    assert np.abs(got - expected.numpy()).max() <= 1e-4
    assert np.array_equal(got.argmax(1), expected.argmax(1).numpy())


def evaluated(checkpoints: str, data: Path, cache: Path, *options: str) -> dict:
    """`cnn-job evaluate`'s JSON report of `checkpoints` on the data at `data`."""
    import json

    from tests.conftest import run_cli

    report = run_cli("evaluate", checkpoints, "--data-uri", str(data), "--cache-dir", str(cache),
                     "--json", "-", *options)
    assert report.returncode == 0, report.stderr
    return json.loads(report.stdout)


def predicted_classes(checkpoints: str, images, folder: Path) -> list[int]:
    """`cnn-job predict`'s top class for each of `images` (test-split uint8), written as PNGs."""
    import json

    from tests.conftest import run_cli

    predicted = run_cli("predict", checkpoints, *map(str, write_pngs(images, folder)), "--json")
    assert predicted.returncode == 0, predicted.stderr
    return [json.loads(line)["top"][0]["index"] for line in predicted.stdout.splitlines()]


def write_mnist_idx(images, labels, folder: Path) -> list[Path]:
    """MNIST's archive format: gzipped IDX files of images (N×28×28) and labels (N)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = images.numpy()[..., 0]
    images_path, labels_path = folder / "my-images-idx3-ubyte.gz", folder / "my-labels-idx1-ubyte.gz"
    header = b"\0\0\x08\x03" + b"".join(n.to_bytes(4, "big") for n in pixels.shape)
    images_path.write_bytes(gzip.compress(header + pixels.tobytes()))
    labels_path.write_bytes(gzip.compress(b"\0\0\x08\x01" + len(labels).to_bytes(4, "big")
                                          + labels.numpy().astype(np.uint8).tobytes()))
    return [images_path, labels_path]


def write_cifar_batch(images, labels, path: Path) -> Path:
    """CIFAR-10's archive format for one batch: a pickled dict of N×3072 rows (R, G, B planes)."""
    rows = images.numpy().transpose(0, 3, 1, 2).reshape(len(images), -1)
    path.write_bytes(pickle.dumps({b"data": rows, b"labels": labels.tolist()}, protocol=2))
    return path
