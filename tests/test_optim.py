"""job.optim.Adam against torch.optim.Adam(fused=True): the same update bit for bit, and state
dicts that move both ways (checkpoints written before it, or by it, resume either way). The
optimisers' flat buffers against their per-tensor path (FLAT_BUFFERS False): the same losses,
weights and states bit for bit, for Adam and for the fast recipe's SGD, and checkpoints that
move between the two."""

import pytest
import torch
import torch.nn.functional as F

from job import optim
from job.checkpoint import from_bytes, to_bytes
from job.optim import Adam
from job.recipes import load
from job.recipes.fast import fast_sgd, init_whitening, summed_smoothed_cross_entropy


@pytest.fixture(params=[True, False], ids=["flat", "per-tensor"])
def flat(request, monkeypatch):
    """Each test that takes it runs with the flat buffers and with the per-tensor path."""
    monkeypatch.setattr(optim, "FLAT_BUFFERS", request.param)
    return request.param


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
def test_the_same_updates_bit_for_bit_as_torch_fused_adam(dataset, flat):
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


def test_state_dicts_move_both_ways_and_training_continues_identically(flat):
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


def test_moments_saved_in_another_memory_layout_are_taken_in_the_parameters_layout(flat):
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


# ----------------------------------------------------------------------------------------------
# flat buffers against the per-tensor path

STEPS = 6
FROZEN_FROM = 3  # the fast recipe's whitening bias freezes (lr_scale 0) from this step on


def built(net, dataset="cifar10", n=16):
    """The net (channels_last, from one seed) and its recipe's optimiser and loss, the optimiser
    built as FLAT_BUFFERS says now."""
    torch.manual_seed(0)
    model = load(dataset, net).build_model().to(memory_format=torch.channels_last)
    if net == "seed":
        return model, Adam(model.parameters(), 1e-3), F.cross_entropy
    init_whitening(model, batch(dataset, n=64, seed=99)[0])
    summed = summed_smoothed_cross_entropy(1)
    return model, fast_sgd(model, 0.2, n), lambda logits, labels: summed(logits, labels)[0]


def train_steps(model, optimizer, criterion, net, dataset, steps):
    """Steps `steps` (a range) at a decaying rate; for SGD the whitening bias frozen from
    FROZEN_FROM on, as FastTraining.begin_epoch does. The losses."""
    peak = 1e-3 if net == "seed" else 0.2
    losses = []
    for step in steps:
        images, labels = batch(dataset, seed=step)
        if net == "fast":
            optimizer.set_lr_scale("whitening_bias", step < FROZEN_FROM)
        optimizer.set_lr(peak * (1 - step / STEPS))
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def trained(monkeypatch, flat, net, dataset="cifar10", steps=range(STEPS)):
    monkeypatch.setattr(optim, "FLAT_BUFFERS", flat)
    model, optimizer, criterion = built(net, dataset)
    return model, optimizer, train_steps(model, optimizer, criterion, net, dataset, steps)


def assert_same_states(ours: dict, theirs: dict):
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert ours["state"][index].keys() == state.keys()
        for key, value in state.items():
            mine = ours["state"][index][key]
            assert mine.shape == value.shape and mine.dtype == value.dtype, (index, key)
            assert torch.equal(mine, value), (index, key)


@pytest.mark.parametrize("net, dataset", [("seed", "mnist"), ("seed", "cifar10"),
                                          ("fast", "cifar10")])
def test_flat_buffers_train_bit_for_bit_as_the_per_tensor_path(monkeypatch, net, dataset):
    """Adam (seed nets) and the fast recipe's SGD (three groups, the whitening bias frozen by
    lr_scale 0 halfway): the same losses, weights and state_dict tensors, compared exactly
    (torch.equal), after six steps at a changing rate from the same weights and batches. The
    parameters are views of one buffer, in their own layouts (conv weights channels_last), each
    starting aligned; the gaps between them stay zero."""
    ours, flat_optimizer, flat_losses = trained(monkeypatch, True, net, dataset)
    theirs, per_tensor, per_tensor_losses = trained(monkeypatch, False, net, dataset)
    assert all(map(torch.equal, flat_losses, per_tensor_losses))
    buffer, grads = flat_optimizer.flat.params, flat_optimizer.flat.grads
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)
        assert p.stride() == q.stride()
        if p.requires_grad:  # the fast net's frozen weights are in no optimiser
            assert p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
            assert p.grad.untyped_storage().data_ptr() == grads.untyped_storage().data_ptr()
            assert (p.data_ptr() - buffer.data_ptr()) % optim.FLAT_ALIGNMENT_BYTES == 0
    gaps = torch.ones(len(buffer), dtype=torch.bool)
    for (_, _, start), end in zip(flat_optimizer.flat.layout, flat_optimizer.flat.ends):
        gaps[start:end] = False
    assert gaps.any() and not buffer[gaps].any() and not grads[gaps].any()
    convs = [m.weight for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert_same_states(flat_optimizer.state_dict(), per_tensor.state_dict())
    start = built(net, dataset)[0]
    assert all(not torch.equal(p, q) for p, q in zip(ours.parameters(), start.parameters())
               if p.requires_grad)  # every optimised weight trained


def test_a_group_frozen_by_lr_scale_0_neither_moves_nor_decays_in_the_flat_buffer(monkeypatch):
    model, optimizer, _ = trained(monkeypatch, True, "fast", steps=range(FROZEN_FROM))
    bias, others = model.whiten.bias.clone(), [p.clone() for p in optimizer.params]
    train_steps(model, optimizer, built("fast")[2], "fast", "cifar10", range(FROZEN_FROM, STEPS))
    assert torch.equal(model.whiten.bias, bias)
    assert sum(not torch.equal(p, q) for p, q in zip(optimizer.params, others)) == len(others) - 1


@pytest.mark.parametrize("net", ["seed", "fast"])
def test_checkpoints_move_between_flat_and_per_tensor_and_training_continues_identically(
        monkeypatch, net):
    """Three steps each way, the states swapped through a checkpoint's bytes, three more: the
    four runs end on the same weights."""
    runs = {flat: trained(monkeypatch, flat, net, steps=range(3)) for flat in (True, False)}
    saved = {flat: (saved_and_loaded(optimizer.state_dict()), model.state_dict())
             for flat, (model, optimizer, _) in runs.items()}
    finals = []
    for flat, (model, optimizer, _) in runs.items():
        monkeypatch.setattr(optim, "FLAT_BUFFERS", not flat)
        other_model, other_optimizer, criterion = built(net)
        other_model.load_state_dict(saved[flat][1])
        other_optimizer.load_state_dict(saved[flat][0])
        for m, o in ((model, optimizer), (other_model, other_optimizer)):
            train_steps(m, o, criterion, net, "cifar10", range(3, STEPS))
            finals.append(m)
    first = list(finals[0].parameters())
    for model in finals[1:]:
        assert all(map(torch.equal, first, model.parameters()))


def test_the_gradients_stay_in_the_flat_buffer_even_when_something_drops_them(monkeypatch):
    """zero_grad zeroes the buffer in place; a model.zero_grad() (grads set to None) before
    backward costs nothing in results: step takes the new gradients back into the buffer."""
    ours, optimizer, criterion = built("seed")
    grads = [p.grad for p in ours.parameters()]
    images, labels = batch("cifar10")
    criterion(ours(images), labels).backward()
    optimizer.step()
    optimizer.zero_grad()
    assert all(p.grad is g for p, g in zip(ours.parameters(), grads))
    assert not optimizer.flat.grads.any()
    ours.zero_grad()  # sets them to None
    criterion(ours(images), labels).backward()
    optimizer.step()
    assert all(p.grad is g for p, g in zip(ours.parameters(), grads))
    monkeypatch.setattr(optim, "FLAT_BUFFERS", False)
    theirs, per_tensor, _ = built("seed")
    train_steps(theirs, per_tensor, criterion, "seed", "cifar10", [0, 0])  # the same two steps
    assert all(map(torch.equal, ours.parameters(), theirs.parameters()))


def test_a_parameter_taken_out_of_the_flat_buffer_is_an_error_not_a_silent_miss():
    model, first, criterion = built("seed")
    Adam(model.parameters(), 1e-3)  # re-homes the same parameters into a buffer of its own
    images, labels = batch("cifar10")
    criterion(model(images), labels).backward()
    with pytest.raises(RuntimeError, match="left its optimiser's flat buffer"):
        first.step()


def test_a_flat_adam_refuses_a_state_whose_parameters_took_different_step_counts(monkeypatch):
    """torch.optim.Adam skips a parameter without a gradient, so its state may count different
    steps per parameter; one flat buffer has one count. The per-tensor path takes it."""
    model, optimizer, _ = trained(monkeypatch, False, "seed", steps=range(2))
    state = saved_and_loaded(optimizer.state_dict())
    state["state"][0]["step"] = torch.tensor(1.0)
    Adam(model.parameters(), 1e-3).load_state_dict(state)
    monkeypatch.setattr(optim, "FLAT_BUFFERS", True)
    with pytest.raises(ValueError, match="different step counts"):
        Adam(model.parameters(), 1e-3).load_state_dict(state)
