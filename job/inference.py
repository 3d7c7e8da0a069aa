"""After training: a checkpoint (loaded by URI, checkpoint.py) evaluated on a test split
(data.py), and asked to classify images (images.py). `cnn-job evaluate` and `cnn-job predict`
hand off here.

Evaluation is training's own `evaluate()` over the same on-device batches (DeviceBatches) with
the run's evaluation batch size and precision, so the final checkpoint of a run scores exactly
the `final_val_acc` its training reported. Images for `predict` are brought to what the
dataset's images look like, then normalised by DeviceBatches too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from job import distributed
from job.batches import DeviceBatches
from job.checkpoint import load_checkpoint
from job.config import default_cache_dir, uses_bf16
from job.data import load_test_split, read_test_files
from job.errors import JobError, strip_userinfo
from job.evaluation import evaluate, tta_logits
from job.images import prepare_image
from job.step import autocast_for, tune_device
from job.storage import read_object

# ----------------------------------------------------------------------------------------------
# evaluate


def evaluate_checkpoint(checkpoint_uri: str, *, data_uri: str | None, test_data: list[str],
                        cache_dir: Path | None, device: str, batch_size: int | None,
                        precision: str | None, endpoint_url: str | None,
                        log: Callable[[str], None], tta: bool | None = None) -> dict | None:
    """Training's evaluation of a checkpoint over a test split: the report on rank 0, None on
    the other ranks. Under torchrun the split is sharded over the ranks and the sums
    all-reduced, as after every training epoch. `tta` None: test-time augmentation as training
    evaluated these weights."""
    if batch_size is not None and batch_size < 1:
        raise JobError("--batch-size must be at least 1")
    d = distributed.setup(device)
    say = log if d.is_main else (lambda message: None)
    try:
        checkpoint = load_checkpoint(checkpoint_uri, endpoint_url, say)
        p, saved = checkpoint.preset, checkpoint.state["config"]
        if test_data:
            split = read_test_files(p, test_data, checkpoint.location, endpoint_url)
        else:
            split = load_test_split(p, data_uri or saved.get("data_uri"),
                                    cache_dir or default_cache_dir(), endpoint_url)
        batch_size = batch_size or saved.get("eval_batch_size", 1000)
        precision = precision or saved.get("precision", "auto")
        tune_device(d.device)  # as training runs its evaluation
        batches = DeviceBatches(split.images, split.labels, p, d.device, batch_size, shuffle=False,
                                rank=d.rank, world_size=d.world_size)
        tta = checkpoint.val_acc_with_tta if tta is None else tta
        result = evaluate(checkpoint.model(d.device), batches, d, autocast_for(precision, d.device),
                          len(p.class_names), checkpoint.recipe.tta if tta else None)
    finally:
        distributed.teardown(d)
    if not d.is_main:
        return None
    trained_on = {name: digest for name, digest in checkpoint.state.get("data_sha256", {}).items()
                  if name in split.sha256}
    same_data = (trained_on == split.sha256) if trained_on else None
    if same_data is False:
        say(f"note: this test data differs from the run's (sha256 of {', '.join(split.sha256)}): "
            "its accuracy is not comparable with the one training reported")
    correct = int(result.confusion.diagonal().sum())
    return {
        "checkpoint": strip_userinfo(checkpoint.location),
        "dataset": p.name,
        "data": strip_userinfo(split.source),
        "data_sha256": split.sha256,
        "same_data_as_training": same_data,
        "images": int(result.confusion.sum()),
        "correct": correct,
        "loss": result.loss,
        "accuracy": result.accuracy,
        "training_val_acc": checkpoint.val_acc,
        "training_val_acc_with_tta": checkpoint.val_acc_with_tta,
        "class_names": list(p.class_names),
        "per_class_accuracy": dict(zip(p.class_names, result.per_class_accuracy())),
        "confusion_matrix": result.confusion.tolist(),  # rows: true class, columns: predicted
        "device": str(d.device),
        "precision": "bf16" if uses_bf16(precision, d.device.type) else "fp32",
        "tta": tta,
        "world_size": d.world_size,
        "batch_size": batch_size,
        "step": checkpoint.state["step"],
        "epoch": checkpoint.state["epoch"],
        "run_id": (checkpoint.state.get("run") or {}).get("id"),
    }


# ----------------------------------------------------------------------------------------------
# predict

def predict(checkpoint_uri: str, image_uris: list[str], *, top_k: int, device: str,
            endpoint_url: str | None, log: Callable[[str], None], batch_size: int = 256,
            tta: bool | None = None) -> list[dict]:
    """The top-k classes and probabilities of each image, in the order given. Every image is
    read and decoded before any is classified, so a bad one stops the command before output.
    `tta` None: test-time augmentation as training evaluated these weights."""
    if top_k < 1:
        raise JobError("--top-k must be at least 1")
    checkpoint = load_checkpoint(checkpoint_uri, endpoint_url, log)
    p = checkpoint.preset
    pixels = [prepare_image(read_object(uri, "IMAGE", endpoint_url), p, uri) for uri in image_uris]
    target = distributed.pick_device(device)
    model = checkpoint.model(target)
    images = torch.from_numpy(np.stack(pixels))
    batches = DeviceBatches(images, torch.zeros(len(images), dtype=torch.long), p, target, batch_size,
                            shuffle=False)
    k = min(top_k, len(p.class_names))
    tta = checkpoint.val_acc_with_tta if tta is None else tta
    results = []
    with torch.no_grad():
        for batch, _ in batches.epoch(0):
            logits = tta_logits(model, batch, checkpoint.recipe.tta) if tta else model(batch)
            probabilities, classes = F.softmax(logits.float(), dim=1).topk(k, dim=1)
            results += zip(probabilities.tolist(), classes.tolist())
    return [{"image": strip_userinfo(uri),
             "top": [{"class": p.class_names[c], "index": c, "probability": prob}
                     for prob, c in zip(probs, classes)]}
            for uri, (probs, classes) in zip(image_uris, results)]
