import pytest
import torch
import torch.nn.functional as F

from mnist_bench.models import depth, forward_flops, mlp, n_params, train_flops
from mnist_bench.sizes import funnel_widths

CASES = [(), (256,), (256, 128), (256, 128, 64), (256, 128, 64, 32), (32, 16, 16, 8, 8)]


@pytest.mark.parametrize("hidden", CASES)
def test_shapes_depth_and_gradients(hidden):
    torch.manual_seed(0)  # narrow ReLU layers can start dead for some draws; fix the draw
    model = mlp(hidden)
    assert depth(model) == len(hidden) + 1
    x = torch.rand(8, 784)
    logits = model(x)
    assert logits.shape == (8, 10)
    F.cross_entropy(logits, torch.arange(8) % 10).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_counts():
    assert n_params(mlp((256, 128, 64))) == 242_762  # the source text's depth-4 MLP
    assert n_params(mlp(())) == 7_850  # softmax regression


def test_flops():
    assert forward_flops(mlp(())) == 2 * 784 * 10
    # depth 2: forward 2*(784*h + h*10), weight grads the same, input grads of layer 2 only.
    h = 100
    assert train_flops(mlp((h,))) == 2 * 2 * (784 * h + h * 10) + 2 * h * 10


def test_funnel_and_bad_widths():
    assert funnel_widths(1) == () and funnel_widths(4) == (256, 128, 64)
    with pytest.raises(ValueError):
        funnel_widths(0)
    with pytest.raises(ValueError):
        mlp((0, 5))


@pytest.mark.parametrize("budget", [60_000, 242_762, 1_000_000, 20_000, 3_000_000])
@pytest.mark.parametrize("depth", [2, 3, 4, 5, 6])
def test_matched_budget_widths_are_a_halving_funnel_within_two_percent(depth, budget):
    from mnist_bench.sizes import count_params, funnel_for_budget

    widths = funnel_for_budget(depth, budget)
    assert len(widths) == depth - 1 and min(widths) >= 8
    assert all(a >= b for a, b in zip(widths, widths[1:]))  # a decreasing funnel (flat only at the floor)
    assert all(b == max(8, round(widths[0] / 2**i)) for i, b in enumerate(widths))
    assert count_params(widths) == n_params(mlp(widths))
    assert abs(count_params(widths) - budget) <= 0.02 * budget


def test_the_source_network_is_its_own_matched_funnel():
    from mnist_bench.sizes import funnel_for_budget

    assert funnel_for_budget(4, 242_762) == (256, 128, 64) and funnel_for_budget(1, 242_762) == ()


@pytest.mark.parametrize("depth", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("budget", [60_000, 242_762, 1_000_000])
def test_constant_width_shape_is_equally_wide_within_two_percent_and_never_under_16(depth, budget):
    from mnist_bench.sizes import count_params, widths_for_budget

    constant = widths_for_budget(depth, budget, 16, "constant")
    funnel = widths_for_budget(depth, budget, 16, "funnel")
    assert len(constant) == depth - 1 and len(set(constant)) == 1
    assert abs(count_params(constant) / budget - 1) <= 0.02 and abs(count_params(funnel) / budget - 1) <= 0.02
    assert min(constant) >= 16 and min(funnel) >= 16
    if depth == 2:
        assert constant == funnel  # one hidden layer: the same network


def test_an_unknown_shape_is_a_usage_error():
    from mnist_bench.errors import UsageError
    from mnist_bench.sizes import widths_for_budget

    with pytest.raises(UsageError, match="shape"):
        widths_for_budget(3, 60_000, 16, "pyramid")
