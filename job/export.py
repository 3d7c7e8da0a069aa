"""`cnn-job export`: a checkpoint's net as a file a server loads without this project's code.

Formats:
- onnx: `torch.onnx.export` (the torch.export-based exporter), input `images` N×C×H×W float32
  with a dynamic batch dimension, output `logits` N×classes; for onnxruntime, TensorRT, ...
- torch-export: the `torch.export` program (`.pt2`), loaded with `torch.export.load` and torch
  alone, batch dimension dynamic too. It is PyTorch's successor to TorchScript: torch.jit's
  script, trace and save are deprecated in torch 2.x, and this is the graph the ONNX exporter
  and AOTInductor start from.
- safetensors: the weights of the recipe's net (state_dict names), for code that builds
  the net itself.

Each file carries what a server needs in one JSON document, `SERVING_KEY`: input name, shape,
layout, channel order and normalisation, class names, and provenance (checkpoint, run id,
step, epoch, validation accuracy, the data's sha256, the git commit of the exporting code). It is
the ONNX model's metadata_props entry `cnn_job`, the safetensors header's `__metadata__` entry
`cnn_job`, and the `.pt2` archive's extra file `cnn_job.json`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import datetime, timezone

import torch

from job.checkpoint import LoadedCheckpoint, load_checkpoint
from job.errors import JobError
from job.evaluation import WithTTA
from job.preemption import Interrupted, StopRequest
from job.storage import Output

FORMATS = ("onnx", "torch-export", "safetensors")
SERVING_KEY = "cnn_job"  # ONNX metadata_props / safetensors metadata key; the .pt2 has cnn_job.json
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def serving_metadata(checkpoint: LoadedCheckpoint, fmt: str, tta: bool = False) -> dict:
    """What a server needs to feed the net and read its answer, and where the weights come from."""
    p = checkpoint.preset
    return {
        "format": fmt,
        "dataset": p.name,
        "net": checkpoint.net,
        # Whether the file's logits are already the test-time augmented ones (the recipe's views,
        # e.g. identity, mirror, 1-pixel shifts up-left and down-right reflect-padded, each
        # mirrored; weights below): then a server feeds plain images and does nothing more.
        "test_time_augmentation": tta,
        **({"tta_views": checkpoint.recipe.tta.description,
            "tta_weights": list(checkpoint.recipe.tta.weights)} if tta else {}),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": ["batch", p.channels, p.image_size, p.image_size],
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "channel_order": "grayscale" if p.channels == 1 else "RGB",
        "normalization": "input = (pixel / 255 - mean[channel]) / std[channel], pixel in 0..255",
        "mean": list(p.mean),
        "std": list(p.std),
        "class_names": list(p.class_names),
        "output": "logits, one per class in class_names order; softmax gives probabilities",
        **checkpoint.provenance(),
        "torch_version": torch.__version__,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_checkpoint(checkpoint_uri: str, fmt: str, output_uri: str, endpoint_url: str | None,
                      log: Callable[[str], None], tta: bool | None = None) -> dict:
    """Write the checkpoint's net to `output_uri` (a local path or s3://BUCKET/KEY) in `fmt`, in one
    atomic step; returns where, how many bytes, and the metadata it carries. The ONNX and
    torch-export programs carry test-time augmentation when `tta` says so (None: when training
    evaluated these weights with it, so the file scores the val_acc it reports); safetensors
    holds weights only."""
    if fmt not in FORMATS:
        hint = (": torch.jit (TorchScript) is deprecated in torch 2.x; use --format torch-export, "
                "its successor, loaded with torch.export.load" if fmt == "torchscript" else "")
        raise JobError(f"--format {fmt} is not one of {', '.join(FORMATS)}{hint}")
    output = Output(output_uri, "--output", endpoint_url)
    output.check()  # before the work: an unwritable output fails in a second, not after export
    checkpoint = load_checkpoint(checkpoint_uri, endpoint_url, log)
    tta = (checkpoint.val_acc_with_tta if tta is None else tta) and fmt != "safetensors"
    metadata = serving_metadata(checkpoint, fmt, tta)
    model = checkpoint.model(torch.device("cpu"), channels_last=False)
    model = WithTTA(model, checkpoint.recipe.tta).eval() if tta else model
    convert = {"onnx": onnx_bytes, "torch-export": torch_export_bytes,
               "safetensors": safetensors_bytes}[fmt]
    # The exporters import torch._dynamo, onnxscript, ... as they go (seconds). A stop signal
    # raised in the middle of that can half-initialise a module or be swallowed by a finalizer,
    # and torch then fails with an error of its own: the signal waits for the conversion, and
    # then stops the command (exit 75) before anything is written.
    with StopRequest() as stop:
        data = convert(model, metadata)
    if stop.signal_name:
        raise Interrupted(stop.signal_name)
    return {"output": output.write(data), "format": fmt, "bytes": len(data), "metadata": metadata}


def _example_and_dims(metadata: dict):
    channels, height, width = metadata["input_shape"][1:]
    example = torch.zeros(2, channels, height, width)
    return example, ({0: torch.export.Dim("batch")},)


def exported_program(model, metadata: dict):
    example, dynamic_shapes = _example_and_dims(metadata)
    return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)


def onnx_bytes(model, metadata: dict) -> bytes:
    example, dynamic_shapes = _example_and_dims(metadata)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes,
                                verbose=False)
    proto = program.model_proto  # weights inline: the net is ~1.5 MB, far below protobuf's 2 GB
    proto.producer_name = "cnn-job"
    proto.doc_string = (f"{metadata['dataset']} {metadata['net']} CNN; metadata_props['{SERVING_KEY}'] "
                        "holds its input, normalisation, class names and provenance as JSON")
    entry = proto.metadata_props.add()
    entry.key, entry.value = SERVING_KEY, json.dumps(metadata)
    return proto.SerializeToString()


def torch_export_bytes(model, metadata: dict) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(exported_program(model, metadata), buffer,
                      extra_files={f"{SERVING_KEY}.json": json.dumps(metadata)})
    return buffer.getvalue()


def safetensors_bytes(model, metadata: dict) -> bytes:
    from safetensors.torch import save

    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    return save(weights, metadata={SERVING_KEY: json.dumps(metadata), "format": "pt"})

