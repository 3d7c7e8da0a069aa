"""The training step: forward, loss, backward and the optimiser's update, run eagerly or
replayed from a CUDA graph; and the precision and kernel choices that training and evaluation share.

On a GPU the seed recipe's eager step at batch 64 is bound by kernel launches (about a hundred
per step, each microseconds of CPU time), not by the GPU. A CUDA graph records the step's
kernels once and replays them with one launch: the same kernels on the same memory, so a
replay computes what the eager step would. It is chosen over torch.compile because it adds no
compile time (tens of seconds, against a whole CIFAR-10 run of a few) and needs no compiler
toolchain on the GPU machine.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import time
from collections.abc import Callable

import torch

from job.config import uses_bf16
from job.errors import JobError
from job.optim import SGD, Adam

# Full batches run eagerly before the capture: the libraries load their kernels and create their
# handles, and the optimizer allocates its state, outside the graph. They are real steps of the
# run, not extra ones.
WARMUP_STEPS = 3


def tune_device(device: torch.device) -> None:
    """How this process uses its device, for training and evaluation alike.

    Host memory, on every device: glibc's malloc keeps the memory of freed tensors for the next
    step (see `keep_freed_host_memory`).

    On CUDA, how the libraries pick kernels: TF32 for fp32 matmuls and convolutions, and cuDNN's
    heuristics rather than its search. On an H200, timing each convolution's algorithms
    (cudnn.benchmark) cost 1-4 s of a 3-7 s run, more than its kernels ever won back
    (bench/gpu_variants.py: --net fast trained in 2.65-2.91 s without it, 3.9-7.27 s with)."""
    keep_freed_host_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


# Allocations up to this size come from malloc's heap, and freed memory up to TRIM at its top
# stays there: a CPU step's activations and gradients (24 MB for the seed CIFAR-10 net at batch
# 64) are then reused from step to step instead of mapped afresh.
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest; bigger blocks are still mapped and unmapped
TRIM_THRESHOLD_BYTES = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


@functools.cache
def keep_freed_host_memory() -> bool:
    """Fix glibc malloc's thresholds for this process (once; True if set). Left alone, glibc
    adapts them to what is freed: a step whose tensors are all freed by its end leaves the top
    of the heap free, glibc returns it to the kernel, and the next step takes it back one page
    fault at a time. The seed CIFAR-10 net took 6,000-6,700 faults a step that way (24 MB zeroed
    by the kernel each time) and lost 20-30% of its CPU images/s; set, about 10. A user's own
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ wins; other C libraries are left as they are."""
    if platform.libc_ver()[0] != "glibc" or any(
            name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def autocast_for(precision: str, device: torch.device) -> Callable:
    """--precision as a context-manager factory for training's and evaluation's forward passes:
    bf16 autocast where `uses_bf16` says so, else a disabled autocast (fp32)."""
    return functools.partial(torch.autocast, device.type, torch.bfloat16,
                             enabled=uses_bf16(precision, device.type))


def resolve_compile(mode: str, device: torch.device, distributed: bool) -> str:
    """--compile as it applies here: "cuda-graph" or "off". `auto` graphs on one GPU only: CPU
    has no graphs, and DDP's gradient all-reduce is not captured (eager there)."""
    if mode == "auto":
        return "cuda-graph" if device.type == "cuda" and not distributed else "off"
    if mode == "cuda-graph" and device.type != "cuda":
        raise JobError("--compile cuda-graph needs a CUDA device: use --compile auto or off on "
                       f"{device.type}")
    if mode == "cuda-graph" and distributed:
        raise JobError("--compile cuda-graph runs one process; under torchrun use --compile "
                       "auto or off (DDP steps run eagerly)")
    return mode


class TrainStep:
    """`step(images, labels, lr)` trains one batch and returns its mean loss, a device tensor
    (reading it is the caller's sync to make, not every step).

    Graphed: the first WARMUP_STEPS full batches run eagerly on a side stream, the next is
    captured, and every full batch after it is two copies into the graph's input buffers and
    one replay. A batch of another size (an epoch's short last one) runs eagerly: the graph's
    shapes are static. If the capture fails, the run says so in one line and goes on eagerly.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Adam | SGD, autocast: Callable,
                 graphed: bool, say: Callable[[str], None], batch_size: int,
                 criterion: Callable) -> None:
        self.model, self.optimizer, self.autocast = model, optimizer, autocast
        self.criterion = criterion  # (logits, labels) -> (loss to differentiate, mean to report)
        self.graphed, self.say = graphed, say
        self.warm_steps = 0
        self.replayed = False  # the graph's first replay, timed, is done
        self.graph: torch.cuda.CUDAGraph | None = None
        self.full_batch = batch_size  # the only batch size the graph holds
        self.static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x, y, loss
        # Seconds of the run's first steps, each synchronised: what start-up costs beyond the
        # first step (kernels loaded, handles made, the capture). See `_timed`.
        self.first_steps_s: dict[str, float] = {}

    @property
    def mode(self) -> str:
        """How steps run now, as --compile names it: "cuda-graph", or "off" (eager; also after a
        failed capture)."""
        return "cuda-graph" if self.graphed else "off"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        self.optimizer.set_lr(lr)
        if not self.graphed:
            if "second_eager_step_s" in self.first_steps_s:  # timed: no sync from here on
                return self.eager(images, labels)
            first = "first_eager_step_s" not in self.first_steps_s
            return self._timed("first_eager_step" if first else "second_eager_step", self.eager,
                               images, labels)
        if len(labels) != self.full_batch:  # a short batch: the graph's shapes are static
            return self.eager(images, labels)
        if self.graph is not None and self.replayed:
            return self._replay(images, labels)
        if self.graph is None and self.warm_steps < WARMUP_STEPS:
            self.warm_steps += 1
            return self._timed("warmup_steps", self._on_side_stream, images, labels)
        if self.graph is None:
            self._timed("graph_capture", self._capture, images, labels)
            if self.graph is None:
                return self.eager(images, labels)
        self.replayed = True
        return self._timed("first_replay", self._replay, images, labels)

    def _replay(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        static_images, static_labels, static_loss = self.static
        static_images.copy_(images)
        static_labels.copy_(labels)
        self.graph.replay()
        return static_loss

    def _timed(self, name: str, work: Callable, images: torch.Tensor, labels: torch.Tensor):
        """`work(images, labels)`, its seconds added to first_steps_s[name + "_s"], synchronised
        on CUDA so that they are the device's too. Only the first steps are timed (the caller
        decides): the sync would cost every step its overlap."""
        key = f"{name}_s"
        started = time.perf_counter()
        result = work(images, labels)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        self.first_steps_s[key] = self.first_steps_s.get(key, 0.0) + time.perf_counter() - started
        return result

    def eager(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss, reported = self.criterion(self.model(images), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return reported.detach()

    def _on_side_stream(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Warm-up before a capture belongs on a stream other than the default one (CUDA's rule).
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            loss = self.eager(images, labels)
        main.wait_stream(side)
        return loss

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        # The input buffers: a capture runs nothing, so they are filled before each replay.
        static_images = torch.empty_like(images)  # keeps channels_last
        static_labels = torch.empty_like(labels)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                # Flat buffers (job/optim.py): the gradients are zeroed in place at every replay
                # and backward adds into them. Otherwise they are dropped here, and backward
                # allocates them in the graph's memory.
                self.optimizer.zero_grad()
                # autocast's cache of bf16 weights would be captured stale: off in a graph
                with self.autocast(cache_enabled=False):
                    loss, reported = self.criterion(self.model(static_images), static_labels)
                loss.backward()
                self.optimizer.step()
        except RuntimeError as error:  # an op this GPU or PyTorch cannot capture
            # torch.cuda.graph (2.11) leaves its capture stream current when ending the capture
            # raises, and that error only says the capture was invalidated: the first one says why.
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize()
            self.optimizer.zero_grad()
            self.graphed = False
            cause = error.__context__ or error
            self.say(f"CUDA graph capture failed ({str(cause).splitlines()[0][:200]}): "
                     "training on eagerly, which computes the same")
            return
        self.graph, self.static = graph, (static_images, static_labels, reported.detach())
