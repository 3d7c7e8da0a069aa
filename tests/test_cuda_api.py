"""The CUDA-only code's calls into torch, checked on the CPU against the installed torch.

CI has no GPU, and a GPU visit is minutes long: a torch that renamed a function or a keyword the
CUDA path uses (torch.cuda.*, the graph capture, the NCCL group, the fused Adam overload with the
learning rate as a tensor) must fail here, not there. What can run on a CPU runs; what cannot is
checked against the installed torch's own signatures, operator schemas and kernel registrations.
"""

import ast
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from job.optim import Adam
from job.recipes import load
from tests.conftest import REPO

# The files whose code runs only on a GPU, in part or whole.
CUDA_PATHS = ["job/step.py", "job/optim.py", "job/distributed.py", "job/train.py",
              "job/checkpoint.py", "job/inference.py", "bench/gpu_check.py", "tests/test_gpu.py"]


def torch_names(tree: ast.Module) -> dict[str, str]:
    """Local names bound to torch modules by the file's imports (`dist` → torch.distributed)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """`dist.init_process_group` → "torch.distributed.init_process_group"; None if not torch's."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    return ".".join([names[node.id], *reversed(parts)])


def resolve(path: str):
    """The object at a dotted path, importing submodules on the way (torch.distributed.run)."""
    import importlib

    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: index + 1]))
    return obj


def torch_uses():
    """(file:line, dotted path, call node or None) for every torch attribute the files use."""
    for relative in CUDA_PATHS:
        tree = ast.parse((REPO / relative).read_text())
        names = torch_names(tree)
        calls = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
        for node in ast.walk(tree):
            # stores too: a flag set under a name torch no longer reads would change nothing
            if isinstance(node, ast.Attribute):
                path = dotted(node, names)
                if path is not None:
                    yield f"{relative}:{node.lineno}", path, calls.get(id(node))


def test_every_torch_attribute_the_cuda_paths_use_exists():
    missing = []
    for where, path, _ in torch_uses():
        try:
            resolve(path)
        except (AttributeError, ImportError) as error:
            missing.append(f"{where}: {path} ({error})")
    assert not missing, "\n".join(missing)


def accepts(function, call: ast.Call) -> str | None:
    """Why `function` would refuse the call's keywords and number of arguments, or None."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None  # a builtin without one: operators are checked against their schemas below
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    try:
        signature.bind_partial(*range(len(call.args)), **{k.arg: None for k in call.keywords})
    except TypeError as error:
        return str(error)
    return None


def test_every_torch_call_on_the_cuda_paths_binds_to_its_signature():
    refused = []
    for where, path, call in torch_uses():
        if call is not None:
            why = accepts(resolve(path), call)
            if why:
                refused.append(f"{where}: {path}: {why}")
    assert not refused, "\n".join(refused)


def test_the_operators_the_fused_step_calls_take_its_keywords_and_have_cuda_kernels():
    """torch._fused_adam_ has no Python signature: its keywords are read from job/optim.py's call
    and checked against the overload that takes the learning rate as a tensor (the CUDA path's)."""
    tree = ast.parse((REPO / "job/optim.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and dotted(n.func, torch_names(tree)) == "torch._fused_adam_")
    schema = torch.ops.aten._fused_adam_.tensor_lr._schema
    arguments = {a.name: a for a in schema.arguments}
    assert {k.arg for k in call.keywords} <= arguments.keys(), schema
    assert str(arguments["lr"].type) == "Tensor" and arguments["lr"].kwarg_only
    assert len(call.args) == sum(not a.kwarg_only for a in schema.arguments)
    if torch.version.cuda is None:
        pytest.skip("a CPU-only build of torch has no CUDA kernels to look for")
    for op in ("aten::_fused_adam_.tensor_lr", "aten::_foreach_add_.Scalar"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


class Dispatched(TorchDispatchMode):
    """The ATen overloads that ran (real dispatch: the ops run as they would)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_adam_with_the_learning_rate_as_a_tensor_is_torch_fused_adams_update_bit_for_bit():
    """On CUDA job.optim.Adam keeps the rate in a float32 device tensor; here the same form on the
    CPU dispatches the same tensor_lr overload, and matches torch.optim.Adam(fused=True) given a
    tensor rate, step for step, as the rate changes in place (as set_lr does under a graph)."""
    torch.manual_seed(0)
    theirs_net = load("cifar10", "seed").build_model().to(memory_format=torch.channels_last)
    ours_net = load("cifar10", "seed").build_model().to(memory_format=torch.channels_last)
    ours_net.load_state_dict(theirs_net.state_dict())
    theirs = torch.optim.Adam(theirs_net.parameters(), lr=torch.tensor(1e-3), fused=True)
    ours = Adam(ours_net.parameters(), 1e-3)
    ours.lr = torch.tensor(1e-3, dtype=torch.float32)  # what Adam holds on CUDA, on this CPU
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        images = torch.randn(8, 3, 32, 32, generator=generator).contiguous(
            memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (8,), generator=generator)
        lr = 1e-3 * (1 - step / 4)
        theirs.param_groups[0]["lr"].fill_(lr)
        ours.set_lr(lr)
        for net, optimizer in ((theirs_net, theirs), (ours_net, ours)):
            optimizer.zero_grad()
            F.cross_entropy(net(images), labels).backward()
        with Dispatched() as dispatched:
            ours.step()
        theirs.step()
        assert "aten._fused_adam_.tensor_lr" in dispatched.ops
        for p, q in zip(theirs_net.parameters(), ours_net.parameters()):
            assert torch.equal(p, q)


def test_autocast_takes_the_arguments_the_graph_capture_gives_it():
    # train.py's factory, called as step.py's capture calls it (the cache off in a graph)
    autocast = functools.partial(torch.autocast, "cuda", torch.bfloat16, enabled=False)
    with autocast(cache_enabled=False):
        pass


def test_the_graph_capture_and_nccl_apis_are_there():
    """What step.py, train.py and distributed.py call on objects, not on torch by name."""
    for method in ("capture_begin", "capture_end", "replay", "pool"):
        assert callable(getattr(torch.cuda.CUDAGraph, method)), method
    assert "capture_error_mode" in inspect.signature(torch.cuda.graph).parameters
    assert callable(torch.cuda.Stream.wait_stream)
    if torch.version.cuda is None:
        pytest.skip("a CPU-only build of torch has no NCCL")
    assert torch.distributed.is_nccl_available()
