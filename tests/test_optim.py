"""job.optim.Adam against torch.optim.Adam(fused=True): the same update bit for bit, and state
dicts that move both ways (checkpoints written before it, or by it, resume either way)."""

import pytest
import torch
import torch.nn.functional as F

from job.checkpoint import from_bytes, to_bytes
from job.optim import Adam
from job.recipes import load


def nets(dataset="cifar10"):
    torch.manual_seed(0)
    a = load(dataset, "seed").build_model().to(memory_format=torch.channels_last)
    b = load(dataset, "seed").build_model().to(memory_format=torch.channels_last)
    b.load_state_dict(a.state_dict())
    return a, b


def batch(dataset, n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (n, 3, 32, 32) if dataset == "cifar10" else (n, 1, 28, 28)
    images = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 10, (n,), generator=generator)


def torch_step(model, optimizer, images, labels, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()


def our_step(model, optimizer, images, labels, lr):
    optimizer.set_lr(lr)
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()


def saved_and_loaded(state: dict) -> dict:
    """Through a checkpoint's bytes, as a resume reads it (torch.optim.Adam would otherwise keep
    the very tensors it was given)."""
    return from_bytes(to_bytes({"model": {}, "optimizer": state, "config": {"dataset": "cifar10"},
                                "rng": {}, "epoch": 0, "step": 0, "metrics": []}))["optimizer"]


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_the_same_updates_bit_for_bit_as_torch_fused_adam(dataset):
    a, b = nets(dataset)
    theirs, ours = torch.optim.Adam(a.parameters(), lr=1e-3, fused=True), Adam(b.parameters(), 1e-3)
    for step in range(6):
        images, labels = batch(dataset, seed=step)
        lr = 1e-3 * (1 - step / 6)  # a decaying schedule, as the loop's
        torch_step(a, theirs, images, labels, lr)
        our_step(b, ours, images, labels, lr)
        assert same_weights(a, b), f"differs after step {step + 1}"
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert ours_state["param_groups"] == theirs_state["param_groups"]
    for index, state in theirs_state["state"].items():
        for key, value in state.items():
            assert torch.equal(ours_state["state"][index][key], value), (index, key)
            assert ours_state["state"][index][key].dtype == value.dtype


def test_state_dicts_move_both_ways_and_training_continues_identically():
    a, b = nets()
    theirs, ours = torch.optim.Adam(a.parameters(), lr=1e-3, fused=True), Adam(b.parameters(), 1e-3)
    for step in range(3):
        torch_step(a, theirs, *batch("cifar10", seed=step), 1e-3)
        our_step(b, ours, *batch("cifar10", seed=step), 1e-3)
    # swap: torch's state into ours and ours into torch's (as a resume across versions does)
    a2, b2 = nets()
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    ours_from_theirs = Adam(a2.parameters(), 1e-3)
    ours_from_theirs.load_state_dict(saved_and_loaded(theirs.state_dict()))
    theirs_from_ours = torch.optim.Adam(b2.parameters(), lr=1e-3, fused=True)
    theirs_from_ours.load_state_dict(saved_and_loaded(ours.state_dict()))
    for step in range(3, 6):
        images, labels = batch("cifar10", seed=step)
        torch_step(a, theirs, images, labels, 1e-3)
        our_step(a2, ours_from_theirs, images, labels, 1e-3)
        our_step(b, ours, images, labels, 1e-3)
        torch_step(b2, theirs_from_ours, images, labels, 1e-3)
    assert same_weights(a, a2) and same_weights(b, b2) and same_weights(a, b)


def test_moments_saved_in_another_memory_layout_are_taken_in_the_parameters_layout():
    a, _ = nets()
    ours = Adam(a.parameters(), 1e-3)
    our_step(a, ours, *batch("cifar10"), 1e-3)
    state = ours.state_dict()
    contiguous = {"param_groups": state["param_groups"], "state": {
        i: {k: v.contiguous() for k, v in s.items()} for i, s in state["state"].items()}}
    again = Adam(a.parameters(), 1e-3)
    again.load_state_dict(contiguous)
    for p, loaded, saved in zip(a.parameters(), again.state, ours.state):
        assert loaded["exp_avg"].stride() == p.stride()
        assert torch.equal(loaded["exp_avg"], saved["exp_avg"])


@pytest.mark.parametrize("mangle, message", [
    (lambda s: s["param_groups"].append(dict(s["param_groups"][0])), "does not fit"),
    (lambda s: s["param_groups"][0].update(params=[0, 1]), "does not fit"),
    (lambda s: s["state"][0].update(exp_avg=torch.zeros(3)), "exp_avg of parameter 0"),
    (lambda s: s["state"].pop(3), "some parameters have none"),
    (lambda s: s["state"][2].pop("step"), "step of 2"),
    (lambda s: s.update(state=[]), "does not fit"),
])
def test_a_state_dict_of_another_net_is_refused_in_one_line(mangle, message):
    a, _ = nets()
    ours = Adam(a.parameters(), 1e-3)
    our_step(a, ours, *batch("cifar10"), 1e-3)
    state = ours.state_dict()
    state = {"param_groups": [dict(g) for g in state["param_groups"]],
             "state": {i: dict(s) for i, s in state["state"].items()}}
    mangle(state)
    with pytest.raises(ValueError, match=message):
        Adam(a.parameters(), 1e-3).load_state_dict(state)
    with pytest.raises(ValueError):
        Adam(load("mnist", "seed").build_model().parameters(), 1e-3).check(ours.state_dict())


def test_a_fresh_optimizer_state_loads_as_fresh():
    a, _ = nets()
    ours = Adam(a.parameters(), 1e-3)
    ours.load_state_dict(torch.optim.Adam(a.parameters(), fused=True).state_dict())  # no steps yet
    assert all(not s for s in ours.state)
