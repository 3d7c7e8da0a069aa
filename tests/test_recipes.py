"""The recipes: the registry (which (dataset, --net) pairs exist, their defaults, read without
torch), and each recipe's parts: the seed CNNs' shapes, every recipe's Training round trip."""

import importlib

import pytest
import torch
from torch import nn

from job import recipes
from job.config import TrainConfig
from job.errors import JobError
from job.recipes import load
from tests.test_cli import run_without_torch


def test_output_shapes_and_layer_sizes():
    cifar = load("cifar10", "seed").build_model()
    assert cifar(torch.zeros(5, 3, 32, 32)).shape == (5, 10)
    convs = [m for m in cifar.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1)),
    ]
    linears = [m for m in cifar.modules() if isinstance(m, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(2048, 128), (128, 10)]

    mnist = load("mnist", "seed").build_model()
    assert mnist(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    convs = [m for m in mnist.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 64)]
    linears = [m for m in mnist.modules() if isinstance(m, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(3136, 128), (128, 10)]


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = load("cifar10", "seed").build_model().eval()
    images = torch.randn(4, 3, 32, 32)
    expected = model(images)
    model = model.to(memory_format=torch.channels_last)
    got = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def seed_ordered_copy(model: nn.Module) -> nn.Sequential:
    """The origin write-up's layer order: conv → ReLU → pool, sharing our parameters."""
    layers = []
    for block in model.features:
        layers += [block[0], nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, model.classifier)


def test_pool_then_relu_is_the_seeds_relu_then_pool():
    torch.manual_seed(1)
    ours = load("cifar10", "seed").build_model()
    seed = seed_ordered_copy(ours)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.randint(0, 10, (8,))
    ours_logits, seed_logits = ours(images), seed(images)
    assert torch.equal(ours_logits, seed_logits)
    ours_grads = torch.autograd.grad(
        nn.functional.cross_entropy(ours_logits, labels), list(ours.parameters())
    )
    seed_grads = torch.autograd.grad(
        nn.functional.cross_entropy(seed_logits, labels), list(ours.parameters())
    )
    for ours_grad, seed_grad in zip(ours_grads, seed_grads):
        torch.testing.assert_close(ours_grad, seed_grad)


def test_state_dict_keys_are_stable():
    assert list(load("mnist", "seed").build_model().state_dict()) == [
        "features.0.0.weight", "features.0.0.bias", "features.1.0.weight", "features.1.0.bias",
        "classifier.1.weight", "classifier.1.bias", "classifier.3.weight", "classifier.3.bias",
    ]


# ----------------------------------------------------------------------------------------------
# the registry


def test_defaults_and_help_are_read_without_importing_torch():
    result = run_without_torch("from job import recipes; print(recipes.defaults('cifar10', "
                               "'fast')['epochs'], recipes.net_help())")
    assert result.stdout.startswith("10 seed (mnist, cifar10): The seed CNNs")


@pytest.mark.parametrize(("dataset", "net"), list(recipes.RECIPES))
def test_each_recipes_defaults_read_from_source_are_the_modules_own(dataset, net):
    module = importlib.import_module(f"job.recipes.{recipes.RECIPES[dataset, net]}")
    assert recipes.defaults(dataset, net) == module.DEFAULTS
    assert set(module.DEFAULTS) == set(recipes.PER_RECIPE)
    cfg = TrainConfig(dataset=dataset, net=net)
    assert {name: getattr(cfg, name) for name in recipes.PER_RECIPE} == module.DEFAULTS


@pytest.mark.parametrize(("dataset", "net"), list(recipes.RECIPES))
def test_each_recipe_builds_a_net_and_a_training_that_round_trips(dataset, net):
    """The net takes the dataset's images; Training's checkpoint entries load into a fresh
    Training of a fresh net and are checked against it."""
    recipe = load(dataset, net)
    p = recipe.dataset
    torch.manual_seed(0)
    model = recipe.build_model()
    assert model(torch.zeros(2, p.channels, p.image_size, p.image_size)).shape == (2, 10)
    images = torch.randint(0, 256, (256, p.image_size, p.image_size, p.channels), dtype=torch.uint8)
    labels = torch.randint(0, 10, (256,))
    batches = recipe.train_batches(images, labels, torch.device("cpu"), 64,
                                   augment=recipes.defaults(dataset, net)["augment"], seed=0)
    training = recipe.start(model, batches, recipes.defaults(dataset, net)["lr"])
    training.begin_epoch(0)
    for step, (x, y) in enumerate(batches.epoch(0), start=1):
        loss, _ = training.criterion(model(x), y)
        training.optimizer.zero_grad()
        loss.backward()
        training.optimizer.set_lr(1e-3)
        training.optimizer.step()
        training.after_step(step, step / 4)
    state = training.state_dict()
    assert "optimizer" in state
    fresh = recipe.start(recipe.build_model(), batches, 1e-3)
    fresh.check(state)
    fresh.load_state_dict(state)
    assert fresh.state_dict().keys() == state.keys()
    other = load("mnist" if dataset == "cifar10" else "cifar10", "seed")
    with pytest.raises(ValueError, match="does not fit"):
        other.start(other.build_model(), batches, 1e-3).check(state)


def test_a_pair_without_a_recipe_and_an_unknown_dataset_are_one_line_each():
    with pytest.raises(JobError, match=r"^--net turbo has no recipe for mnist: train it with --net "):
        recipes.check("mnist", "turbo")
    with pytest.raises(JobError, match="unknown dataset 'svhn'"):
        recipes.check("svhn", "seed")


def test_a_checkpoint_from_before_recipes_is_the_seed_recipes():
    assert recipes.saved_net({"dataset": "mnist"}) == "seed"
    assert recipes.saved_net({"dataset": "cifar10", "net": "fast"}) == "fast"


def test_help_shows_each_recipes_defaults():
    assert recipes.default_text("epochs").startswith("seed: 5; fast: ")
    assert "seed (mnist, cifar10)" in recipes.net_help()


@pytest.mark.parametrize(("dataset", "net"), list(recipes.RECIPES))
def test_tta_mirrors_only_what_a_mirror_leaves_in_its_class(dataset, net):
    # A mirrored CIFAR-10 truck is a truck; a mirrored 2 is no digit at all.
    p = load(dataset, net).dataset
    images = torch.arange(2 * p.channels * p.image_size ** 2, dtype=torch.float32).view(
        2, p.channels, p.image_size, p.image_size)
    views = load(dataset, net).tta.views(images)
    mirrored = any(torch.equal(view, images.flip(-1)) for view in views)
    assert mirrored == (dataset == "cifar10") and len(views) == (6 if mirrored else 3)
