"""Stacked training: a network's run does not depend on the pack it trained in (CPU, one thread)."""

import dataclasses

import pytest
import torch

from mnist_bench.errors import UsageError
from mnist_bench.models import mlp
from mnist_bench.train import TrainConfig, train, train_pack

WIDTHS = (235, 47, 11)  # odd on purpose: vector tails, and slices at every alignment in a stack
BASE = TrainConfig(lr=0.05, momentum=0.9, schedule="linear", weight_decay=1e-4, epochs=2, batch_size=50, seed=5)


def run(configs, data, **kwargs):
    models = [mlp(WIDTHS) for _ in configs]
    return models, train_pack(models, data, configs, **kwargs)


def same_run(model_a, result_a, model_b, result_b):
    """Bit-identical weights, epoch metrics and test predictions."""
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    strip = [dataclasses.replace(e, train_seconds=0.0) for e in result_a.epochs]
    assert strip == [dataclasses.replace(e, train_seconds=0.0) for e in result_b.epochs]
    assert result_a.test_accuracy == result_b.test_accuracy and result_a.test_loss == result_b.test_loss
    assert torch.equal(result_a.test_predictions, result_b.test_predictions)


@pytest.fixture(scope="module")
def alone(small):
    """BASE trained alone (a pack of one), at two rates and two seeds."""
    configs = {
        "base": BASE,
        "lr": dataclasses.replace(BASE, lr=0.2),
        "seed": dataclasses.replace(BASE, seed=9),
    }
    return {k: run([c], small) for k, c in configs.items()}


@pytest.mark.parametrize("size", [3, 7])
def test_shared_batch_pack_of_rates_is_bit_identical_to_training_alone(small, alone, size):
    """One seed's band of learning rates: every network sees the same batches (the first layer one product)."""
    rates = [0.01 * (i + 1) for i in range(size)]
    rates[1], rates[-1] = BASE.lr, 0.2
    models, results = run([dataclasses.replace(BASE, lr=r) for r in rates], small)
    assert all(r.pack == size for r in results)
    same_run(alone["base"][0][0], alone["base"][1][0], models[1], results[1])
    same_run(alone["lr"][0][0], alone["lr"][1][0], models[-1], results[-1])


@pytest.mark.parametrize("size", [3, 7])
def test_separate_batch_pack_of_seeds_is_bit_identical_to_training_alone(small, alone, size):
    """One rate's seeds: each network its own initialisation and batch order."""
    seeds = [100 + i for i in range(size)]
    seeds[0], seeds[-1] = BASE.seed, 9
    models, results = run([dataclasses.replace(BASE, seed=s) for s in seeds], small)
    same_run(alone["base"][0][0], alone["base"][1][0], models[0], results[0])
    same_run(alone["seed"][0][0], alone["seed"][1][0], models[-1], results[-1])
    assert not torch.equal(results[0].test_predictions, results[1].test_predictions)  # they are different runs


@pytest.mark.parametrize("size, shared", [(3, True), (7, False)])
def test_plain_sgd_packs_are_pack_invariant_too(small, size, shared):
    """The text's recipe (no momentum, no decay, constant rate): the update accumulates straight into the
    weights, through the same products."""
    recipe = TrainConfig(lr=0.2, epochs=2, batch_size=50, seed=5)
    (alone_model,), (alone_result,) = run([recipe], small)
    if shared:
        configs = [dataclasses.replace(recipe, lr=r) for r in (0.1, 0.2, 0.4)[:size]]
    else:
        configs = [dataclasses.replace(recipe, seed=s) for s in (11, 5, *range(20, 20 + size - 2))]
    models, results = run(configs, small)
    assert all(r.pack == size for r in results)
    same_run(alone_model, alone_result, models[1], results[1])
    assert results[0].test_loss != results[1].test_loss  # they are different runs
    assert results[1].test_accuracy > 0.5


def test_a_pack_of_one_is_the_single_network_trainer(small, alone):
    model = mlp(WIDTHS)
    result = train(model, small, BASE)
    same_run(alone["base"][0][0], alone["base"][1][0], model, result)


def test_a_diverging_network_leaves_the_pack_and_the_others_are_unchanged(small, alone):
    configs = [dataclasses.replace(BASE, lr=1e6), BASE, dataclasses.replace(BASE, lr=0.2)]
    models, results = run(configs, small)
    assert results[0].diverged and results[0].epochs == [] and results[0].test_accuracy is None
    assert 0 < results[0].samples_seen < 2 * 2000
    same_run(alone["base"][0][0], alone["base"][1][0], models[1], results[1])
    same_run(alone["lr"][0][0], alone["lr"][1][0], models[2], results[2])


def test_stopping_or_interrupting_one_network_leaves_the_others_to_finish(small, alone):
    steps = []
    configs = [BASE, dataclasses.replace(BASE, seed=9), dataclasses.replace(BASE, seed=11)]
    models, results = run(
        configs,
        small,
        on_epoch=[None, None, lambda m: True],  # "pruned" after its first epoch
        should_stop=[None, lambda: steps.append(1) or len(steps) >= 7, None],  # interrupted at step 7
    )
    same_run(alone["base"][0][0], alone["base"][1][0], models[0], results[0])
    assert results[1].interrupted and results[1].epochs == [] and results[1].samples_seen == 7 * 50
    assert results[2].stopped and len(results[2].epochs) == 1 and results[2].test_accuracy is not None


def test_networks_with_other_epochs_leave_when_done_and_time_shares_add_up(small, alone):
    configs = [dataclasses.replace(BASE, epochs=1, schedule="constant"), BASE]
    models, results = run(configs, small)
    assert [len(r.epochs) for r in results] == [1, 2]
    same_run(alone["base"][0][0], alone["base"][1][0], models[1], results[1])
    assert results[0].samples_seen == 2000 and results[1].samples_seen == 4000
    assert 0 < results[0].train_seconds < results[1].train_seconds  # alone in its second epoch


def test_networks_of_a_pack_may_train_on_their_own_splits(small, alone):
    """A seed may fix its own validation hold-out: the pack gathers each network's batch from its data."""
    from mnist_bench.data import MNIST

    flipped = MNIST(small.train_x.flip(0), small.train_y.flip(0), small.val_x, small.val_y, small.test_x, small.test_y)
    models, results = run([BASE, BASE], [small, flipped])
    same_run(alone["base"][0][0], alone["base"][1][0], models[0], results[0])
    assert not torch.equal(results[0].test_predictions, results[1].test_predictions)


@pytest.mark.parametrize(
    "models, configs, match",
    [
        ([mlp((8,)), mlp((9,))], [BASE, BASE], "one shape"),
        ([mlp((8,)), mlp((8,))], [BASE, dataclasses.replace(BASE, batch_size=64)], "batch size"),
        ([mlp((8,)), mlp((8,))], [BASE, dataclasses.replace(BASE, optimizer="adam")], "optimizer"),
        ([mlp((8,)), mlp((8,))], [BASE, dataclasses.replace(BASE, momentum=0.5)], "momentum"),
        ([mlp((8,)), mlp((8,))], [BASE, dataclasses.replace(BASE, weight_decay=0.0)], "weight decay"),
        ([mlp((8,))], [BASE, BASE], "one config"),
    ],
)
def test_a_pack_that_cannot_share_a_pass_is_refused(small, models, configs, match):
    with pytest.raises(UsageError, match=match):
        train_pack(models, small, configs)


def test_adam_packs_are_pack_invariant_too(small):
    adam = dataclasses.replace(BASE, optimizer="adam", lr=0.003, momentum=0.0, epochs=1)
    alone_model, (alone_result,) = run([adam], small)
    models, results = run([dataclasses.replace(adam, seed=s) for s in (2, BASE.seed, 3)], small)
    same_run(alone_model[0], alone_result, models[1], results[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_cuda_pack_reruns_bit_identically(small):
    """CUDA may pick other kernels for other pack sizes; the same pack reproduces."""
    from mnist_bench.data import MNIST

    cuda = MNIST(*(getattr(small, f.name).cuda() for f in dataclasses.fields(small)))
    configs = [dataclasses.replace(BASE, seed=s) for s in (1, 2, 3)]
    first, second = run(configs, cuda), run(configs, cuda)
    for a, ra, b, rb in zip(first[0], first[1], second[0], second[1]):
        same_run(a, ra, b, rb)


def test_the_text_network_in_a_pack_of_twelve_at_batch_64_is_bit_identical_to_training_alone(small):
    """The study's default pack size, the text's widths and batch size (one epoch on the 2,000-image subset)."""
    base = dataclasses.replace(BASE, batch_size=64, epochs=1, schedule="linear", weight_decay=0.0)
    alone_model = mlp((256, 128, 64))
    (alone_result,) = train_pack([alone_model], small, [dataclasses.replace(base, seed=7)])
    models = [mlp((256, 128, 64)) for _ in range(12)]
    results = train_pack(models, small, [dataclasses.replace(base, seed=s) for s in range(1, 13)])
    same_run(alone_model, alone_result, models[6], results[6])


def test_where_the_blas_breaks_slices_a_pack_trains_one_network_at_a_time(small, alone, monkeypatch):
    from mnist_bench import train as trainer

    monkeypatch.setattr(trainer, "slices_compute_alone", lambda: False)
    with pytest.warns(RuntimeWarning, match="one network at a time"):
        models, results = run([dataclasses.replace(BASE, seed=9), BASE], small)
    assert [r.pack for r in results] == [1, 1]
    same_run(alone["base"][0][0], alone["base"][1][0], models[1], results[1])


def test_this_process_computes_slices_as_alone_or_says_so():
    """With MKL's strict mode (set by mnist_bench) the check passes; whatever the BLAS, it is one bool."""
    import os

    from mnist_bench.train import slices_compute_alone

    assert os.environ.get("MKL_CBWR") or not torch.backends.mkl.is_available()
    assert slices_compute_alone() in (True, False)
    if torch.backends.mkl.is_available() and os.environ["MKL_CBWR"].endswith("STRICT"):
        assert slices_compute_alone()
