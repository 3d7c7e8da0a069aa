"""Adam, computed by the fused kernel torch.optim.Adam(fused=True) uses (bit for bit the same
update), and saved in torch.optim.Adam's state_dict format, so checkpoints move freely between
the two. Two reasons not to call torch.optim.Adam itself:

- its wrappers import torch._dynamo on first use, to keep torch.compile out of them: 1.1 s of a
  4 s CPU run, and of every start on a GPU, for a compiler this job does not use;
- here the learning rate lives in device memory on CUDA, so a CUDA graph of the whole training
  step (job/step.py) replays each step at that step's rate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# torch.optim.Adam's defaults, which the seed's Adam used.
BETAS = (0.9, 0.999)
EPS = 1e-8


class _Optimizer:
    """What both optimizers share: the parameters they update, whose gradients they drop."""

    params: list[torch.nn.Parameter]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class Adam(_Optimizer):
    """Adam over one group of float32 parameters on one device, no weight decay or amsgrad."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float) -> None:
        self.params = list(params)
        device = self.params[0].device
        # The fused CUDA kernel reads a float32 learning rate from device memory; the CPU one
        # takes a number.
        self.lr: torch.Tensor | float = (
            torch.tensor(float(lr), dtype=torch.float32, device=device)
            if device.type == "cuda" else float(lr))
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]  # at the 1st step

    def set_lr(self, lr: float) -> None:
        """The rate of the next step; on CUDA an asynchronous fill, so no sync and graph-safe."""
        if isinstance(self.lr, torch.Tensor):
            self.lr.fill_(lr)
        else:
            self.lr = float(lr)

    @torch.no_grad()
    def step(self) -> None:
        if not self.state[0]:
            self._init_state()
        live = [(p, s) for p, s in zip(self.params, self.state) if p.grad is not None]
        if not live:
            return
        steps = [s["step"] for _, s in live]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            [p for p, _ in live], [p.grad for p, _ in live], [s["exp_avg"] for _, s in live],
            [s["exp_avg_sq"] for _, s in live], [], steps, amsgrad=False, lr=self.lr,
            beta1=BETAS[0], beta2=BETAS[1], weight_decay=0.0, eps=EPS, maximize=False,
            grad_scale=None, found_inf=None)

    def _init_state(self) -> None:
        for p, state in zip(self.params, self.state):
            # The fused kernel keeps the step count on the parameter's device, as float32.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------------------------------
    # torch.optim.Adam's state_dict format

    def _group(self) -> dict:
        lr = self.lr.item() if isinstance(self.lr, torch.Tensor) else self.lr
        return {"lr": lr, "betas": BETAS, "eps": EPS, "weight_decay": 0, "amsgrad": False,
                "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                "fused": True, "decoupled_weight_decay": False,
                "params": list(range(len(self.params)))}

    def state_dict(self) -> dict:
        return {"state": {i: dict(s) for i, s in enumerate(self.state) if s},
                "param_groups": [self._group()]}

    def check(self, state_dict: dict) -> None:
        """ValueError (one line) unless `state_dict` is one Adam group over these parameters."""
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

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore moments and step counts (written by this class or by torch.optim.Adam, on any
        device); the learning rate is not restored: the loop sets it before every step."""
        self.check(state_dict)
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
# the fast net's optimizer: SGD with Nesterov momentum and decoupled weight decay, and lookahead

MOMENTUM = 0.85
WEIGHT_DECAY_PER_1024 = 0.0153  # decoupled: the decay per step of a batch of 1024 at the peak lr
BN_BIAS_LR_SCALE = 64.0  # the BN biases' lr is this times the rest's (same decay per step)
WHITENING_BIAS_EPOCHS = 3  # the whitening conv's bias trains in these first epochs, then freezes


class SGD(_Optimizer):
    """torch.optim.SGD's update (momentum, Nesterov, weight decay, no dampening) over named groups
    of float32 parameters on one device, in its state_dict format, without torch.optim's import
    of torch._dynamo. Each group's rate is the run's rate times its `lr_scale`, kept in a tensor
    on the parameters' device, so a CUDA graph of the step replays each step at that step's rate;
    a group with lr_scale 0 is frozen (neither updated nor decayed).
    """

    def __init__(self, groups: list[dict], lr: float, momentum: float = MOMENTUM) -> None:
        """groups: dicts of name, params, lr_scale and weight_decay (torch's coupled weight decay,
        applied to the gradient)."""
        self.groups = [dict(group, params=list(group["params"])) for group in groups]
        self.params = [p for group in self.groups for p in group["params"]]
        self.momentum = momentum
        device = self.params[0].device
        self.group_lr = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.groups]
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]  # at the 1st step
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
        if not self.state[0]:
            for p, state in zip(self.params, self.state):
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        index = 0
        for group, rate in zip(self.groups, self.group_lr):
            pairs = [(p, self.state[index + i]["momentum_buffer"])
                     for i, p in enumerate(group["params"]) if p.grad is not None]
            index += len(group["params"])
            if not pairs:
                continue
            params, buffers = [p for p, _ in pairs], [b for _, b in pairs]
            grads = [p.grad for p in params]  # overwritten: zero_grad drops them next
            torch._foreach_add_(grads, params, alpha=group["weight_decay"])
            torch._foreach_mul_(buffers, self.momentum)
            torch._foreach_add_(buffers, grads)  # buffer = momentum · buffer + gradient
            torch._foreach_add_(grads, buffers, alpha=self.momentum)  # Nesterov's look ahead
            torch._foreach_mul_(grads, rate)
            torch._foreach_sub_(params, grads)

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
        for index, state in states.items():
            if not (isinstance(index, int) and 0 <= index < len(self.params)
                    and getattr(state.get("momentum_buffer") if isinstance(state, dict) else None,
                                "shape", None) == self.params[index].shape):
                raise ValueError(f"its optimizer state does not fit the net (parameter {index})")
        if states and len(states) != len(self.params):
            raise ValueError("its optimizer state does not fit the net (some parameters have none)")

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore momentum buffers and each group's lr_scale (a frozen group stays frozen); the
        rate itself is set by the loop before every step."""
        self.check(state_dict)
        for group, saved in zip(self.groups, state_dict["param_groups"]):
            group["lr_scale"] = float(saved["lr_scale"])
        for index, saved in state_dict["state"].items():
            p = self.params[index]
            self.state[index] = {"momentum_buffer": torch.empty_like(p).copy_(saved["momentum_buffer"])}
        self.set_lr(self.lr)


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
               lr)


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
