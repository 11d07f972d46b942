"""pytest-benchmark timings of one training step per model, on the CPU and (where present) CUDA.

Run with timing:      pytest tests/benchmarks --benchmark-enable --benchmark-autosave
Compare to baseline:  pytest tests/benchmarks --benchmark-enable --benchmark-compare --benchmark-compare-fail=mean:10%
The default test command runs each once with benchmarking disabled, proving they work.
"""

import pytest
import torch

from mnist_bench.data import load_mnist
from mnist_bench.throughput import DEPTHS, PACK_DEPTH, PACKS, HarnessStep

STEPS = 20  # training steps per timed call (one device sync per call)
BATCH = 64

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]


@pytest.fixture(scope="module", params=DEVICES)
def data(request):
    return load_mnist(val_size=0, device=request.param)


@pytest.mark.parametrize("depth", DEPTHS, ids=lambda d: "softmax" if d == 1 else f"mlp{d}")
def test_train_step(benchmark, data, depth):
    torch.set_num_threads(1)
    step = HarnessStep(depth, BATCH, data)
    loss = benchmark.pedantic(step.steps, args=(STEPS,), rounds=10, iterations=1, warmup_rounds=2)
    assert torch.isfinite(loss)
    benchmark.extra_info.update(
        device=data.device.type,
        threads=torch.get_num_threads(),
        batch_size=BATCH,
        steps_per_round=STEPS,
        train_flops_per_sample=step.flops_per_sample,
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds_per_step = benchmark.stats.stats.median / STEPS
        benchmark.extra_info["samples_per_s"] = BATCH / seconds_per_step
        benchmark.extra_info["gflops"] = step.flops_per_sample * BATCH / seconds_per_step / 1e9


@pytest.mark.parametrize("order", ["shared", "separate"])
@pytest.mark.parametrize("pack", PACKS, ids=lambda k: f"pack{k}")
def test_pack_step(benchmark, data, pack, order):
    """The text's network in a pack of K (one shared batch order, or one each): model-samples/s in extra_info.
    Compare with test_train_step[mlp4] of the same run for the speedup over K separate runs."""
    if pack == 1 and order == "shared":
        pytest.skip("a pack of one has one batch order")
    torch.set_num_threads(1)
    step = HarnessStep(PACK_DEPTH, BATCH, data, pack=pack, shared=order == "shared")
    loss = benchmark.pedantic(step.steps, args=(STEPS,), rounds=10, iterations=1, warmup_rounds=2)
    assert loss.shape == (pack,) and torch.isfinite(loss).all()
    benchmark.extra_info.update(device=data.device.type, pack=pack, batch_order=order, batch_size=BATCH)
    if benchmark.stats is not None:
        seconds_per_step = benchmark.stats.stats.median / STEPS
        benchmark.extra_info["model_samples_per_s"] = pack * BATCH / seconds_per_step
