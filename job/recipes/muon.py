"""airbench94 with Muon on its conv filters, 8 epochs of batch 2000

The fast recipe's net, whitening, augmentation and test-time views (job/recipes/fast.py), trained
the way Keller Jordan's airbench94_muon.py does (KellerJordan/cifar10-airbench, 2024-11: 94.01%
mean in 2.59 s on an A100, against 3.09 s for the compiled airbench94): the conv filters by
Muon, SGD with Nesterov momentum whose update matrix is orthogonalised by a few Newton–Schulz
iterations; the whitening bias, the BN biases and the head by SGD with Nesterov; batch 2000 for
8 epochs, the rate decayed linearly to 0; no lookahead. Written here from those facts, top to
bottom: the hyperparameters, the optimiser, the optimiser pair the step sees, the recipe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from job.batches import DeviceBatches
from job.errors import JobError
from job.optim import FLAT_BUFFERS, SGD, FlatBuffers, _Optimizer
from job.recipes import base, fast

# ----------------------------------------------------------------------------------------------
# hyperparameters

# DEFAULTS is a plain literal: --help reads it without importing this module. lr is Muon's, the
# run's peak; the SGD groups' rates are fixed multiples of it (their lr_scale).
DEFAULTS = {"epochs": 8, "batch_size": 2000, "lr": 0.24, "lr_schedule": "linear",
            "augment": True, "tta": True}

MUON_MOMENTUM = 0.6  # Nesterov, on the conv filters
NEWTON_SCHULZ_STEPS = 3
# The quintic iteration's coefficients, chosen for the steepest slope at 0: after 3 steps the
# singular values land roughly in 0.5-1.5, not at 1, which trains as well as exact orthogonality.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_EPS = 1e-7

SGD_MOMENTUM = 0.85  # Nesterov, on the rest
BIAS_LR = 0.053  # the whitening and BN biases', for the loss summed over the batch
# The head's: airbench94_muon's 0.67 is for a head of unit-std weights scaled by 1/256; fast's
# net keeps its head of PyTorch's default init scaled by 1/9 (the same initial logits within
# 3%), so the same steps of the logits take 0.67 · (9/256)² on its weights.
HEAD_LR = 0.67 * (9 / 256) ** 2
WEIGHT_DECAY_PER_IMAGE = 2e-6  # of the SGD groups' weights per step and image of the global
# batch (0.004 at 2000), at the peak rate; Muon's filters are renormalised instead

# ----------------------------------------------------------------------------------------------
# Muon


def orthogonalised(matrices: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """A batch of matrices (B × rows × columns), each with its singular values moved toward 1
    by quintic Newton–Schulz iterations (its singular vectors kept): about U Vᵀ of its SVD.
    In bf16 on CUDA (the iteration tolerates it), float32 elsewhere; returned in float32."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrices.to(torch.bfloat16 if matrices.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # X Xᵀ on the shorter side
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + NEWTON_SCHULZ_EPS)  # singular values ≤ 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).float()


class Muon(_Optimizer):
    """Muon over 4-d conv weights (out × in × h × w), each seen as an out × (in·h·w) matrix:
    Nesterov momentum on the gradient, then that direction orthogonalised (`orthogonalised`),
    the weights first renormalised to a Frobenius norm of sqrt(out) (mean filter norm 1: the
    scale the orthogonal steps are for, in place of weight decay), then the step at the rate.

    Matrices of one shape are orthogonalised as one batch (hiverge/cifar10-speedrun's batching).
    Everything stays on the device, the rate included (a tensor, filled by set_lr): no host
    sync, so job/step.py's CUDA graph captures the step. Flat buffers as job/optim.py's
    optimisers keep them; its state_dict is torch.optim's format (momentum_buffer per
    parameter), so a resume continues bit for bit on CPU. Under DDP each rank orthogonalises
    the same all-reduced gradients: the same update everywhere, computed once per rank.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float,
                 momentum: float = MUON_MOMENTUM) -> None:
        self.params = list(params)
        if any(p.dim() != 4 for p in self.params):
            raise ValueError("Muon here updates conv weights (4-d) only")
        self.momentum = momentum
        self.rate = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        self.flat = FlatBuffers(self.params) if FLAT_BUFFERS else None
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]  # at the 1st step
        self.buffer: torch.Tensor | None = None  # flat: all the momentum buffers
        # Parameters by matrix shape: each list is orthogonalised as one batch.
        self.by_shape: dict[tuple[int, int], list[int]] = {}
        for index, p in enumerate(self.params):
            self.by_shape.setdefault((p.shape[0], p[0].numel()), []).append(index)
        self.norms = [math.sqrt(len(p)) for p in self.params]  # each one's Frobenius norm
        self.set_lr(lr)

    def set_lr(self, lr: float) -> None:
        """The rate of the next step: an asynchronous fill on CUDA, so no sync and graph-safe."""
        self.lr = float(lr)
        self.rate.fill_(self.lr)

    @torch.no_grad()
    def step(self) -> None:
        self._ready()
        if self.flat is not None:
            grads, buffers = [self.flat.grads], [self.buffer]
        else:
            grads, buffers = [p.grad for p in self.params], [s["momentum_buffer"] for s in self.state]
        # the gradients are overwritten: zero_grad zeroes or drops them next
        torch._foreach_mul_(buffers, self.momentum)
        torch._foreach_add_(buffers, grads)  # buffer = momentum · buffer + gradient
        torch._foreach_add_(grads, buffers, alpha=self.momentum)  # Nesterov's look ahead
        directions = [p.grad for p in self.params]
        updates: list[torch.Tensor] = [directions[0]] * len(self.params)
        for (rows, columns), indices in self.by_shape.items():
            batch = torch.stack([directions[i].reshape(rows, columns) for i in indices])
            for i, update in zip(indices, orthogonalised(batch)):
                updates[i] = update.view(directions[i].shape)
        torch._foreach_div_(self.params, torch._foreach_norm(self.params))
        torch._foreach_mul_(self.params, self.norms)
        torch._foreach_mul_(updates, self.rate)
        torch._foreach_sub_(self.params, updates)

    def _init_state(self) -> None:
        if self.flat is not None:
            self.buffer = self.flat.zeros()
            for state, view in zip(self.state, self.flat.views(self.buffer)):
                state["momentum_buffer"] = view
            return
        for p, state in zip(self.params, self.state):
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def state_dict(self) -> dict:
        return {"state": {i: dict(s) for i, s in enumerate(self.state) if s},
                "param_groups": [{"lr": self.lr, "momentum": self.momentum, "nesterov": True,
                                  "newton_schulz_steps": NEWTON_SCHULZ_STEPS,
                                  "params": list(range(len(self.params)))}]}

    def check(self, state_dict: dict) -> None:
        """ValueError (one line) unless `state_dict` is this Muon's over these parameters."""
        groups, states = state_dict.get("param_groups"), state_dict.get("state")
        if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
                and isinstance(states, dict)
                and list(groups[0].get("params", ())) == list(range(len(self.params)))):
            raise ValueError("its Muon state does not fit the net")
        self._check_momentum_buffers(states, "Muon")

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the momentum buffers; the rate is set by the loop before every step."""
        self.check(state_dict)
        if state_dict["state"] and not self.state[0]:
            self._init_state()
        for index, saved in state_dict["state"].items():
            self.state[index]["momentum_buffer"].copy_(saved["momentum_buffer"])


# ----------------------------------------------------------------------------------------------
# the optimiser pair: what the step, the loop and the checkpoint see as one optimiser


class MuonAndSGD:
    """Muon on the conv filters and SGD on the rest, set, stepped and saved as one optimiser:
    the rate is Muon's, each SGD group's a fixed multiple of it (its lr_scale). The checkpoint's
    `optimizer` entry holds both states, under "muon" and "sgd"."""

    def __init__(self, muon: Muon, sgd: SGD) -> None:
        self.muon, self.sgd = muon, sgd

    def set_lr(self, lr: float) -> None:
        self.muon.set_lr(lr)
        self.sgd.set_lr(lr)

    def set_lr_scale(self, name: str, scale: float) -> None:
        self.sgd.set_lr_scale(name, scale)

    def zero_grad(self) -> None:
        self.muon.zero_grad()
        self.sgd.zero_grad()

    def step(self) -> None:
        self.muon.step()
        self.sgd.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "sgd": self.sgd.state_dict()}

    def check(self, state_dict: dict) -> None:
        if not all(isinstance(state_dict.get(part), dict) for part in ("muon", "sgd")):
            raise ValueError("its optimizer state is not Muon's and SGD's")
        self.muon.check(state_dict["muon"])
        self.sgd.check(state_dict["sgd"])

    def load_state_dict(self, state_dict: dict) -> None:
        self.check(state_dict)
        self.muon.load_state_dict(state_dict["muon"])
        self.sgd.load_state_dict(state_dict["sgd"])


def muon_and_sgd(model: fast.FastNet, lr: float, global_batch: int) -> MuonAndSGD:
    """Muon on every trainable conv weight; SGD on the whitening bias (its own group, frozen
    after fast.WHITENING_BIAS_EPOCHS), the BN biases and the head. The SGD groups' decay is
    WEIGHT_DECAY_PER_IMAGE · global_batch per step at the peak, handed to SGD as that divided
    by the group's rate (torch's coupled decay, as airbench94_muon sets it)."""
    filters = [p for p in model.parameters() if p.requires_grad and p.dim() == 4]
    bn_biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    groups = [("bn_biases", bn_biases, BIAS_LR), ("whitening_bias", [model.whiten.bias], BIAS_LR),
              ("head", [model.head.weight], HEAD_LR)]
    taken = {id(p) for p in filters} | {id(p) for _, params, _ in groups for p in params}
    if any(p.requires_grad and id(p) not in taken for p in model.parameters()):
        raise ValueError("a trainable parameter of the net is in no optimiser group")
    decay_per_step = WEIGHT_DECAY_PER_IMAGE * global_batch
    default_lr = DEFAULTS["lr"]
    sgd = SGD([{"name": name, "params": params, "lr_scale": group_lr / default_lr,
                "weight_decay": decay_per_step / (lr * group_lr / default_lr)}
               for name, params, group_lr in groups], lr, SGD_MOMENTUM)
    return MuonAndSGD(Muon(filters, lr), sgd)


# ----------------------------------------------------------------------------------------------
# the recipe


class MuonTraining(base.Training):
    """The optimiser pair and fast's summed, smoothed loss; the whitening bias trains in the
    first fast.WHITENING_BIAS_EPOCHS epochs, then its group's lr_scale goes to 0."""

    optimizer: MuonAndSGD

    def begin_epoch(self, epoch: int) -> None:
        on = epoch < fast.WHITENING_BIAS_EPOCHS
        self.optimizer.set_lr_scale("whitening_bias", BIAS_LR / DEFAULTS["lr"] if on else 0.0)


class Recipe(fast.Recipe):
    """fast's net (FastNet), augmentation, whole batches and test-time views; Muon's training."""

    def start(self, model: fast.FastNet, batches: DeviceBatches, lr: float) -> MuonTraining:
        """The whitening filters (from the first normalised training images, on the device),
        the optimiser pair and the loss, for the batches' batch size and world size."""
        batch_size, world_size = batches.batch_size, batches.world_size
        if not batches.remaining(0):
            raise JobError(f"--batch-size {batch_size} × {world_size} processes is more than the "
                           f"{len(batches.images)} training images: --net muon drops an epoch's "
                           "last partial batch, so no step would run; lower --batch-size")
        first = batches.images[:fast.WHITENING_IMAGES].permute(0, 3, 1, 2).float()
        fast.init_whitening(model, first * batches.scale + batches.shift)
        return MuonTraining(muon_and_sgd(model, lr, batch_size * world_size),
                            fast.summed_smoothed_cross_entropy(world_size))
