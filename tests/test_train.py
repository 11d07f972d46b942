import math

import pytest
import torch

from mnist_bench.data import DeviceError, resolve_device
from mnist_bench.models import mlp
from mnist_bench.train import TrainConfig, train


def test_end_to_end_small_subset_learns(small):
    result = train(mlp((64,)), small, TrainConfig(lr=0.1, epochs=3, batch_size=32))
    assert not result.diverged and len(result.epochs) == 3
    assert result.test_accuracy > 0.85  # chance is 0.10
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss
    assert result.samples_seen == 3 * 2000 and result.samples_per_s > 0


def test_same_seed_same_result_different_seed_differs(small):
    config = TrainConfig(epochs=1, seed=7)
    a = train(mlp((32, 16)), small, config)
    b = train(mlp((32, 16)), small, config)
    assert a.test_loss == b.test_loss and a.epochs[0].train_loss == b.epochs[0].train_loss
    c = train(mlp((32, 16)), small, TrainConfig(epochs=1, seed=8))
    assert c.test_loss != a.test_loss


def test_divergence_is_reported_not_raised(small):
    result = train(mlp((64, 64)), small, TrainConfig(lr=1e6, epochs=3))
    assert result.diverged
    assert result.epochs == [] and result.test_accuracy is None


def test_callback_can_stop_and_test_can_be_skipped(small):
    seen = []
    result = train(
        mlp(()), small, TrainConfig(epochs=5), on_epoch=lambda m: seen.append(m) or m.epoch == 2, evaluate_test=False
    )
    assert result.stopped and [m.epoch for m in seen] == [1, 2]
    assert result.test_accuracy is None
    assert 0 <= seen[0].val_accuracy <= 1 and math.isfinite(seen[0].val_loss)


@pytest.mark.parametrize(
    "bad",
    [
        dict(lr=0),
        dict(lr=float("nan")),
        dict(batch_size=0),
        dict(epochs=0),
        dict(optimizer="lbfgs"),
        dict(momentum=1.0),
        dict(threads=0),
    ],
)
def test_config_rejects_impossible_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(DeviceError):
        resolve_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_seed_is_the_same_run_on_cuda_as_on_the_cpu(small):
    """Same seed, same initial weights and batches on either device: CUDA follows the CPU's run, epoch by
    epoch, up to float32 rounding (no TF32), so a study's seeds mean the same thing on both."""
    from mnist_bench.data import MNIST

    cuda = MNIST(
        *(t.cuda() for t in (small.train_x, small.train_y, small.val_x, small.val_y, small.test_x, small.test_y))
    )
    config = TrainConfig(lr=0.1, momentum=0.9, schedule="linear", epochs=3, seed=7)
    on_cpu = train(mlp((64, 32)), small, config)
    on_cuda = train(mlp((64, 32)), cuda, config)
    assert [e.train_loss for e in on_cuda.epochs] == pytest.approx([e.train_loss for e in on_cpu.epochs], rel=1e-3)
    assert [e.val_loss for e in on_cuda.epochs] == pytest.approx([e.val_loss for e in on_cpu.epochs], rel=1e-3)
    assert abs(on_cuda.test_accuracy - on_cpu.test_accuracy) <= 0.005  # 5 of 1,000 test images
    assert on_cuda.test_accuracy > 0.8  # and it learned (chance: 0.1)


def test_should_stop_ends_the_run_after_the_current_step(small):
    calls = []
    result = train(
        mlp((16,)), small, TrainConfig(epochs=3, batch_size=100), should_stop=lambda: calls.append(1) or len(calls) >= 5
    )
    assert result.interrupted and result.epochs == [] and result.test_accuracy is None
    assert len(calls) == 5 and result.samples_seen == 500


def test_the_linear_schedule_decays_from_the_peak_to_zero_step_by_step():
    config = TrainConfig(lr=0.1, epochs=3, schedule="linear", momentum=0.9)
    seen = [config.lr_at(t, steps_per_epoch=4) for t in range(12)]
    assert seen[0] == pytest.approx(0.1) and seen[-1] == pytest.approx(0.1 / 12)
    assert all(a > b for a, b in zip(seen, seen[1:]))  # strictly decreasing
    assert config.lr_at(12, 4) == pytest.approx(0.0)
    assert TrainConfig().lr_at(7, 4) == TrainConfig().lr  # the recipe's constant rate


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(lr=0.1, epochs=2, batch_size=50, seed=3),
        TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, schedule="linear", epochs=2, batch_size=50, seed=3),
        TrainConfig(lr=0.05, momentum=0.9, epochs=2, batch_size=50, seed=3),
        TrainConfig(lr=0.1, weight_decay=1e-3, epochs=2, batch_size=50, seed=3),
        TrainConfig(lr=0.003, optimizer="adam", weight_decay=1e-3, epochs=1, batch_size=50, seed=3),
    ],
    ids=["sgd", "momentum-decay-linear", "momentum", "decay", "adam"],
)
def test_the_trainer_does_what_torch_optim_and_lambdalr_do(small, config):
    """The stacked update is torch.optim.SGD/Adam with LambdaLR's linear decay: a module trained the textbook
    way ends at the same weights up to float32 rounding (the products are batched, so not bit for bit)."""
    import torch.nn.functional as F

    model = mlp((32, 16))
    train(model, small, config)
    reference = mlp((32, 16))
    from mnist_bench.train import reset_parameters

    reset_parameters(reference, config.seed)
    make = torch.optim.Adam if config.optimizer == "adam" else torch.optim.SGD
    kwargs = {} if config.optimizer == "adam" else {"momentum": config.momentum}
    optimizer = make(reference.parameters(), lr=config.lr, weight_decay=config.weight_decay, **kwargs)
    total = config.epochs * -(-len(small.train_x) // config.batch_size)
    linear = config.schedule == "linear"
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t / total) if linear else 1.0)
    order = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        perm = torch.randperm(len(small.train_x), generator=order)
        for i in range(0, len(perm), config.batch_size):
            idx = perm[i : i + config.batch_size]
            loss = F.cross_entropy(reference(small.train_x[idx]), small.train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_an_unknown_schedule_is_a_usage_error():
    from mnist_bench.errors import UsageError

    with pytest.raises(UsageError, match="schedule"):
        TrainConfig(schedule="cosine-ish")


def test_a_linear_schedule_changes_the_run_and_stays_deterministic(small):
    from mnist_bench.models import mlp

    runs = [train(mlp((16,)), small, TrainConfig(lr=0.1, epochs=2, schedule=s, seed=1)) for s in ("linear", "linear")]
    constant = train(mlp((16,)), small, TrainConfig(lr=0.1, epochs=2, seed=1))
    assert runs[0].test_accuracy == runs[1].test_accuracy
    assert runs[0].epochs[-1].train_loss != constant.epochs[-1].train_loss
