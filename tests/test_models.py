import torch
from torch import nn

from job.models import build_model


def test_output_shapes_and_layer_sizes():
    cifar = build_model("cifar10")
    assert cifar(torch.zeros(5, 3, 32, 32)).shape == (5, 10)
    convs = [m for m in cifar.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1)),
    ]
    linears = [m for m in cifar.modules() if isinstance(m, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(2048, 128), (128, 10)]

    mnist = build_model("mnist")
    assert mnist(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    convs = [m for m in mnist.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 64)]
    linears = [m for m in mnist.modules() if isinstance(m, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(3136, 128), (128, 10)]


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = build_model("cifar10").eval()
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
    ours = build_model("cifar10")
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
    assert list(build_model("mnist").state_dict()) == [
        "features.0.0.weight", "features.0.0.bias", "features.1.0.weight", "features.1.0.bias",
        "classifier.1.weight", "classifier.1.bias", "classifier.3.weight", "classifier.3.bias",
    ]
