"""The throughput module's profile: it counts the step's own matrix products."""

import re

from mnist_bench.throughput import profile


def test_the_profile_counts_the_batched_products_the_step_runs():
    """The step's products are batched (bmm, baddbmm, baddbmm_): most of a depth-4 step is theirs."""
    text = profile(4, 64, 1, None, steps=10)
    share = int(re.search(r"matrix products \(.*\) [0-9.]+ ms = (\d+)%", text).group(1))
    assert share >= 30, text
