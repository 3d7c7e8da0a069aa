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


class Adam:
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

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

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
