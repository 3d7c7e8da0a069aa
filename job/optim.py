"""The optimisers the recipes use, and the learning-rate schedules.

Adam and SGD compute what torch.optim.Adam(fused=True) and torch.optim.SGD(nesterov=True)
compute (bit for bit: Adam calls the same fused kernel) and save torch.optim's state_dict
format, so checkpoints move freely between them. Two reasons not to call torch.optim itself:

- its wrappers import torch._dynamo on first use, to keep torch.compile out of them: 1.1 s of a
  4 s CPU run, and of every start on a GPU, for a compiler this job does not use;
- here the learning rate lives in device memory on CUDA, so a CUDA graph of the whole training
  step (job/step.py) replays each step at that step's rate.

Each optimiser keeps its parameters, their gradients and its states in one contiguous buffer
apiece (FLAT_BUFFERS): every parameter's `.data` and `.grad` are views of them, so an update is
one kernel (Adam) or a few (SGD, per group) over one tensor instead of a list of them. On a GPU
the list is the cost: the fused Adam kernel took 73 µs of a 497 µs graphed step of the seed
CIFAR-10 net for 0.36 M weights, launch and list overhead over about ten tensors.

A schedule (`lr_at`) is a pure function of the run's progress in images, so it means the same
at any batch size, world size or resume point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

# torch.optim.Adam's defaults, which the seed recipe's Adam uses.
BETAS = (0.9, 0.999)
EPS = 1e-8

# Each optimiser's weights, gradients and states in one contiguous buffer apiece (FlatBuffers);
# False: each parameter in its own storage and updates over lists of tensors, the path the
# equivalence tests (tests/test_optim.py) compare against.
FLAT_BUFFERS = True
# Where each parameter starts in a flat buffer: on a boundary of this many bytes, as the CUDA
# caching allocator places a tensor of its own, since cuDNN and cuBLAS choose kernels (and vector
# loads) by the pointers' alignment too.
FLAT_ALIGNMENT_BYTES = 512

# ----------------------------------------------------------------------------------------------
# learning-rate schedules

TRIANGLE_PEAK = 0.23  # of the run, where the triangle schedule peaks


def lr_at(schedule: str, peak: float, progress: float) -> float:
    """The learning rate for the step about to run, `progress` of the run's images done: linear
    or cosine decay from `peak` to 0; constant; triangle (airbench94's: 0.2 → 1 × peak over the
    first 23%, then down to 0.07 × peak at the end)."""
    progress = min(progress, 1.0)
    if schedule == "linear":
        return peak * (1 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "triangle":
        rise = progress / TRIANGLE_PEAK
        fall = (progress - TRIANGLE_PEAK) / (1 - TRIANGLE_PEAK)
        return peak * (0.2 + 0.8 * rise if progress < TRIANGLE_PEAK else 1 - 0.93 * fall)
    return peak


# ----------------------------------------------------------------------------------------------
# the flat buffers


class FlatBuffers:
    """An optimiser's parameters re-homed into one contiguous buffer, consecutive in its order,
    and their gradients into another of the same length: each parameter's `.data` and `.grad`
    become views of them with the parameter's own shape and strides (a channels_last conv weight
    stays channels_last, so the net computes exactly what it did). A state (moments, momentum)
    is one more buffer of that length (`zeros`), seen per parameter through `views`. Each
    parameter starts FLAT_ALIGNMENT_BYTES-aligned; the gaps between them are zeros in every
    buffer, which every update leaves at zero.

    The gradients are never dropped: zero_grad zeroes their buffer in place and backward adds
    into it. So a parameter that gets no gradient in a step is updated with a zero one, where
    torch.optim would skip it; every trainable parameter of the recipes' nets gets one every
    step. A parameter belongs to one optimiser, and stays in its buffer: build the optimiser
    after the model's last `.to()`.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            raise ValueError("flat buffers need every parameter of one dtype on one device")
        self.layout: list[tuple[torch.Size, tuple[int, ...], int]] = []  # shape, strides, offset
        self.ends: list[int] = []  # where each parameter's elements end
        align, offset = FLAT_ALIGNMENT_BYTES // first.element_size(), 0
        for p in params:
            offset = -(-offset // align) * align
            # empty_like keeps a dense tensor's strides exactly, channels_last included
            self.layout.append((p.shape, torch.empty_like(p).stride(), offset))
            offset += p.numel()
            self.ends.append(offset)
        self.params = torch.zeros(offset, dtype=first.dtype, device=first.device)
        self.grads = torch.zeros_like(self.params)
        self.grad_views = self.views(self.grads)
        self.addresses = [view.data_ptr() for view in self.views(self.params)]
        with torch.no_grad():
            for p, weights, grad in zip(params, self.views(self.params), self.grad_views):
                weights.copy_(p)
                if p.grad is not None:
                    grad.copy_(p.grad)
                p.data = weights
                p.grad = grad

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """`buffer` (a buffer of this length) as one tensor per parameter, in its layout."""
        return [buffer.as_strided(shape, strides, offset) for shape, strides, offset in self.layout]

    def zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.params)

    def span(self, buffer: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The part of `buffer` that holds parameters start to stop - 1 (and the gaps between)."""
        return buffer[self.layout[start][2]:self.ends[stop - 1]]

    def claim_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Each parameter's gradient back in the buffer, should anything have replaced it (a
        `model.zero_grad()` sets it to None, and backward then makes a new tensor). RuntimeError
        if a parameter itself has left it: the update would miss it."""
        for p, grad, address in zip(params, self.grad_views, self.addresses):
            if p.data_ptr() != address:
                raise RuntimeError("a parameter has left its optimiser's flat buffer (moved by "
                                   ".to(), or taken by another optimiser)")
            if p.grad is not grad:
                if p.grad is None:
                    grad.zero_()
                else:
                    grad.copy_(p.grad)
                p.grad = grad


# ----------------------------------------------------------------------------------------------
# Adam


class _Optimizer:
    """What both optimizers share: the parameters they update (in flat buffers, or each in its
    own storage) and how their gradients are cleared."""

    params: list[torch.nn.Parameter]
    flat: FlatBuffers | None

    def zero_grad(self) -> None:
        """Flat: the gradients zeroed in place, one fill (backward adds into them). Otherwise
        dropped (backward makes new ones)."""
        if self.flat is not None:
            self.flat.grads.zero_()
        else:
            for p in self.params:
                p.grad = None

    def _check_momentum_buffers(self, states: dict, what: str) -> None:
        """ValueError (one line, "its `what` state does not fit the net ...") unless `states`
        holds a momentum buffer of its parameter's shape for every parameter, or for none."""
        for index, state in states.items():
            if not (isinstance(index, int) and 0 <= index < len(self.params)
                    and getattr(state.get("momentum_buffer") if isinstance(state, dict) else None,
                                "shape", None) == self.params[index].shape):
                raise ValueError(f"its {what} state does not fit the net (parameter {index})")
        if states and len(states) != len(self.params):
            raise ValueError(f"its {what} state does not fit the net (some parameters have none)")

    def _ready(self) -> None:
        """Before an update: the state made at the first step, and with flat buffers each
        gradient back in its buffer (see FlatBuffers.claim_grads)."""
        if not self.state[0]:
            self._init_state()
        if self.flat is not None:
            self.flat.claim_grads(self.params)


class Adam(_Optimizer):
    """Adam over one group of float32 parameters on one device, no weight decay or amsgrad."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float,
                 betas: Sequence[float] = BETAS) -> None:
        self.params = list(params)
        self.betas = (float(betas[0]), float(betas[1]))
        device = self.params[0].device
        # The fused CUDA kernel reads a float32 learning rate from device memory; the CPU one
        # takes a number.
        self.lr: torch.Tensor | float = (
            torch.tensor(float(lr), dtype=torch.float32, device=device)
            if device.type == "cuda" else float(lr))
        self.flat = FlatBuffers(self.params) if FLAT_BUFFERS else None
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]  # at the 1st step
        self.moments: tuple[torch.Tensor, torch.Tensor] | None = None  # flat: exp_avg, exp_avg_sq

    def set_lr(self, lr: float) -> None:
        """The rate of the next step; on CUDA an asynchronous fill, so no sync and graph-safe."""
        if isinstance(self.lr, torch.Tensor):
            self.lr.fill_(lr)
        else:
            self.lr = float(lr)

    @torch.no_grad()
    def step(self) -> None:
        self._ready()
        if self.flat is not None:
            params, grads, steps = [self.flat.params], [self.flat.grads], [self.state[0]["step"]]
            exp_avgs, exp_avg_sqs = [self.moments[0]], [self.moments[1]]
        else:
            live = [(p, s) for p, s in zip(self.params, self.state) if p.grad is not None]
            if not live:
                return
            params, grads = [p for p, _ in live], [p.grad for p, _ in live]
            exp_avgs, exp_avg_sqs = [s["exp_avg"] for _, s in live], [s["exp_avg_sq"] for _, s in live]
            steps = [s["step"] for _, s in live]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=self.lr,
            beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0, eps=EPS, maximize=False,
            grad_scale=None, found_inf=None)

    def _init_state(self) -> None:
        if self.flat is not None:
            # One step count, which every parameter shares (each steps every time), and the
            # moments in two buffers: each parameter's state is a view of them.
            step = torch.zeros((), dtype=torch.float32, device=self.flat.params.device)
            self.moments = (self.flat.zeros(), self.flat.zeros())
            for state, exp_avg, exp_avg_sq in zip(self.state, *map(self.flat.views, self.moments)):
                state.update(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
            return
        for p, state in zip(self.params, self.state):
            # The fused kernel keeps the step count on the parameter's device, as float32.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------------------------------
    # torch.optim.Adam's state_dict format

    def _group(self) -> dict:
        lr = self.lr.item() if isinstance(self.lr, torch.Tensor) else self.lr
        return {"lr": lr, "betas": self.betas, "eps": EPS, "weight_decay": 0, "amsgrad": False,
                "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                "fused": True, "decoupled_weight_decay": False,
                "params": list(range(len(self.params)))}

    def state_dict(self) -> dict:
        if self.flat is not None:  # each parameter its own step count, as torch.optim keeps
            return {"state": {i: {**s, "step": s["step"].clone()} for i, s in enumerate(self.state)
                              if s},
                    "param_groups": [self._group()]}
        return {"state": {i: dict(s) for i, s in enumerate(self.state) if s},
                "param_groups": [self._group()]}

    def check(self, state_dict: dict) -> None:
        """ValueError (one line) unless `state_dict` is one Adam group over these parameters (and,
        flat, one whose parameters have all taken the same number of steps)."""
        groups, states = state_dict.get("param_groups"), state_dict.get("state")
        if not (isinstance(groups, list) and len(groups) == 1 and isinstance(states, dict)
                and isinstance(groups[0], dict)
                and list(groups[0].get("params", ())) == list(range(len(self.params)))):
            raise ValueError("its optimizer state does not fit the net")
        for index, state in states.items():
            if not (isinstance(index, int) and 0 <= index < len(self.params)
                    and isinstance(state, dict)):
                raise ValueError("its optimizer state does not fit the net")
            shape = self.params[index].shape
            for key in ("exp_avg", "exp_avg_sq"):
                if getattr(state.get(key), "shape", None) != shape:
                    raise ValueError(f"its optimizer state does not fit the net ({key} of "
                                     f"parameter {index})")
            if not isinstance(state.get("step"), (torch.Tensor, int, float)):
                raise ValueError(f"its optimizer state does not fit the net (step of {index})")
        if states and len(states) != len(self.params):
            raise ValueError("its optimizer state does not fit the net (some parameters have none)")
        if self.flat is not None and len({float(s["step"]) for s in states.values()}) > 1:
            raise ValueError("its optimizer state has parameters at different step counts, which "
                             "one flat Adam cannot continue")

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore moments and step counts (written by this class or by torch.optim.Adam, on any
        device); the learning rate is not restored: the loop sets it before every step."""
        self.check(state_dict)
        if self.flat is not None:
            if state_dict["state"] and not self.state[0]:
                self._init_state()
            for index, saved in state_dict["state"].items():
                state = self.state[index]  # views of the flat moments: copied into, in place
                state["step"].copy_(torch.as_tensor(saved["step"], dtype=torch.float32))
                state["exp_avg"].copy_(saved["exp_avg"])
                state["exp_avg_sq"].copy_(saved["exp_avg_sq"])
            return
        for index, saved in state_dict["state"].items():
            p = self.params[index]
            # The moments take the parameter's own layout (channels_last for conv weights), as
            # the fused kernel walks parameter and moments as one flat run of memory.
            self.state[index] = {
                "step": torch.as_tensor(saved["step"], dtype=torch.float32).to(p.device).clone(),
                "exp_avg": torch.empty_like(p).copy_(saved["exp_avg"]),
                "exp_avg_sq": torch.empty_like(p).copy_(saved["exp_avg_sq"]),
            }


# ----------------------------------------------------------------------------------------------
# SGD


class SGD(_Optimizer):
    """torch.optim.SGD's update (momentum, Nesterov, weight decay, no dampening) over named groups
    of float32 parameters on one device, in its state_dict format, without torch.optim's import
    of torch._dynamo. Each group's rate is the run's rate times its `lr_scale`, kept in a tensor
    on the parameters' device, so a CUDA graph of the step replays each step at that step's rate;
    a group with lr_scale 0 is frozen (neither updated nor decayed). Flat, the groups are
    consecutive slices of the buffers, each updated as one tensor.
    """

    def __init__(self, groups: list[dict], lr: float, momentum: float) -> None:
        """groups: dicts of name, params, lr_scale and weight_decay (torch's coupled weight decay,
        applied to the gradient)."""
        self.groups = [dict(group, params=list(group["params"])) for group in groups]
        self.params = [p for group in self.groups for p in group["params"]]
        self.momentum = momentum
        device = self.params[0].device
        self.group_lr = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.groups]
        self.flat = FlatBuffers(self.params) if FLAT_BUFFERS else None
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]  # at the 1st step
        # flat: each group's (parameters, gradients, momentum buffers), one slice of each buffer
        self.group_slices: list[tuple[list[torch.Tensor], ...]] = []
        self.set_lr(lr)

    def set_lr(self, lr: float) -> None:
        """The rate of the next step: asynchronous fills on CUDA, so no sync and graph-safe."""
        self.lr = float(lr)
        for group, rate in zip(self.groups, self.group_lr):
            rate.fill_(self.lr * group["lr_scale"])

    def set_lr_scale(self, name: str, scale: float) -> None:
        """Change one group's lr_scale from the next set_lr on (0 freezes it)."""
        for group in self.groups:
            if group["name"] == name:
                group["lr_scale"] = float(scale)

    @torch.no_grad()
    def step(self) -> None:
        self._ready()
        for group, rate, (params, grads, buffers) in zip(self.groups, self.group_lr,
                                                          self._group_tensors()):
            if not params:
                continue
            # the gradients are overwritten: zero_grad drops or zeroes them next
            torch._foreach_add_(grads, params, alpha=group["weight_decay"])
            torch._foreach_mul_(buffers, self.momentum)
            torch._foreach_add_(buffers, grads)  # buffer = momentum · buffer + gradient
            torch._foreach_add_(grads, buffers, alpha=self.momentum)  # Nesterov's look ahead
            torch._foreach_mul_(grads, rate)
            torch._foreach_sub_(params, grads)

    def _group_tensors(self) -> list[tuple[list[torch.Tensor], ...]]:
        """Per group, the lists the update runs over: flat, one slice each; otherwise each
        parameter with a gradient, its gradient and its momentum buffer."""
        if self.flat is not None:
            return self.group_slices
        lists, index = [], 0
        for group in self.groups:
            live = [(p, self.state[index + i]["momentum_buffer"])
                    for i, p in enumerate(group["params"]) if p.grad is not None]
            index += len(group["params"])
            lists.append(([p for p, _ in live], [p.grad for p, _ in live], [b for _, b in live]))
        return lists

    def _init_state(self) -> None:
        if self.flat is None:
            for p, state in zip(self.params, self.state):
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return
        momentum = self.flat.zeros()
        for state, buffer in zip(self.state, self.flat.views(momentum)):
            state["momentum_buffer"] = buffer
        start = 0
        for group in self.groups:
            stop = start + len(group["params"])
            self.group_slices.append(
                tuple([self.flat.span(buffer, start, stop)] if stop > start else []
                      for buffer in (self.flat.params, self.flat.grads, momentum)))
            start = stop

    # ------------------------------------------------------------------------------------------
    # torch.optim.SGD's state_dict format (plus each group's name and lr_scale)

    def state_dict(self) -> dict:
        groups, start = [], 0
        for group in self.groups:
            count = len(group["params"])
            groups.append({
                "name": group["name"], "lr_scale": group["lr_scale"],
                "lr": self.lr * group["lr_scale"], "momentum": self.momentum, "dampening": 0,
                "weight_decay": group["weight_decay"], "nesterov": True, "maximize": False,
                "foreach": True, "differentiable": False, "fused": None,
                "params": list(range(start, start + count))})
            start += count
        return {"state": {i: dict(s) for i, s in enumerate(self.state) if s},
                "param_groups": groups}

    def check(self, state_dict: dict) -> None:
        """ValueError (one line) unless `state_dict` is this SGD's groups over these parameters."""
        groups, states = state_dict.get("param_groups"), state_dict.get("state")
        ours = self.state_dict()["param_groups"]
        if not (isinstance(groups, list) and isinstance(states, dict) and len(groups) == len(ours)
                and all(isinstance(g, dict) and g.get("name") == o["name"]
                        and list(g.get("params", ())) == o["params"] for g, o in zip(groups, ours))):
            raise ValueError("its optimizer state does not fit the net")
        self._check_momentum_buffers(states, "optimizer")

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore momentum buffers and each group's lr_scale (a frozen group stays frozen); the
        rate itself is set by the loop before every step."""
        self.check(state_dict)
        for group, saved in zip(self.groups, state_dict["param_groups"]):
            group["lr_scale"] = float(saved["lr_scale"])
        if self.flat is not None and state_dict["state"] and not self.state[0]:
            self._init_state()
        for index, saved in state_dict["state"].items():
            if self.flat is not None:  # a view of the flat momentum: copied into, in place
                self.state[index]["momentum_buffer"].copy_(saved["momentum_buffer"])
                continue
            p = self.params[index]
            self.state[index] = {"momentum_buffer": torch.empty_like(p).copy_(saved["momentum_buffer"])}
        self.set_lr(self.lr)
