"""The throughput module's profile: it counts the step's own matrix products."""

import re

from mnist_bench.throughput import profile


def test_the_profile_counts_the_batched_products_the_step_runs():
    """The step's products are batched (bmm, baddbmm, baddbmm_): most of a depth-4 step is theirs."""
    text = profile(4, 64, 1, None, steps=10)
    share = int(re.search(r"matrix products \(.*\) [0-9.]+ ms = (\d+)%", text).group(1))
    assert share >= 30, text


def test_a_peak_measured_at_a_busy_moment_is_replaced_by_the_faster_measurement_after_the_rows(monkeypatch):
    import torch

    from mnist_bench import throughput

    monkeypatch.setattr(throughput, "peak_gflops", lambda device, timing: 80.0)
    rows = [
        {"device": "cpu", "threads": 1, "gflops": 60.0, "peak_gflops": 40.0, "fraction_of_peak": 1.5},
        {"device": "cpu", "threads": 2, "gflops": 60.0, "peak_gflops": 150.0, "fraction_of_peak": 0.4},
    ]
    throughput.settle_peak(rows, torch.device("cpu"), 1, throughput.QUICK, 40.0, lambda line: None)
    assert rows[0]["peak_gflops"] == 80.0 and rows[0]["fraction_of_peak"] == 0.75
    assert rows[1]["fraction_of_peak"] == 0.4  # another setting's rows keep their own peak
    throughput.settle_peak(rows, torch.device("cpu"), 1, throughput.QUICK, 90.0, lambda line: None)
    assert rows[0]["peak_gflops"] == 90.0  # the larger of before and after
