"""The MLPs' sizes from their hidden widths alone, without PyTorch (a report or a plan needs no tensors):
parameter and FLOP counts, the shapes (halving funnel, constant width) and the widths that meet a budget.
Depth = number of Linear (weight) layers: softmax regression is depth 1, the source text's
784-256-128-64-10 MLP is depth 4 (242,762 parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import UsageError

IN_FEATURES = 28 * 28
N_CLASSES = 10
SOURCE_WIDTHS = (256, 128, 64)  # the source text's depth-4 MLP
FUNNEL = (256, 128, 64, 32)  # hidden widths cut to depth for the throughput sweep


def funnel_widths(depth: int) -> tuple[int, ...]:
    """Hidden widths of the 256-128-64-32 funnel cut to `depth` Linear layers (depth 1 = softmax)."""
    if not 1 <= depth <= len(FUNNEL) + 1:
        raise UsageError(f"funnel depth must be in 1..{len(FUNNEL) + 1}, got {depth}")
    return FUNNEL[: depth - 1]


def count_params(hidden: Sequence[int]) -> int:
    """Parameters of mlp(hidden) without building it (weights and biases of every Linear layer)."""
    dims = [IN_FEATURES, *map(int, hidden), N_CLASSES]
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def layer_flops(hidden: Sequence[int]) -> list[int]:
    """Multiply-adds x2 of each Linear layer of mlp(hidden) for one sample."""
    dims = [IN_FEATURES, *map(int, hidden), N_CLASSES]
    return [2 * a * b for a, b in zip(dims[:-1], dims[1:])]


def forward_flops(hidden: Sequence[int]) -> int:
    """One sample's forward pass (biases and ReLU ignored, < 1%)."""
    return sum(layer_flops(hidden))


def train_flops(hidden: Sequence[int]) -> int:
    """FLOPs of one training sample: forward, weight gradients, and input gradients for every layer
    but the first (nothing upstream of the input needs them). About 3x forward."""
    per_layer = layer_flops(hidden)
    return 2 * sum(per_layer) + sum(per_layer[1:])


def halving_funnel(depth: int, width: int, min_width: int = 8) -> tuple[int, ...]:
    """Hidden widths w, w/2, w/4, ... (the source text's 256-128-64 shape), none below `min_width`."""
    return tuple(max(min_width, round(width / 2**i)) for i in range(depth - 1))


def constant_width(depth: int, width: int, min_width: int = 8) -> tuple[int, ...]:
    """Every hidden layer `width` units wide (at least `min_width`)."""
    return (max(min_width, width),) * (depth - 1)


SHAPES = {"funnel": halving_funnel, "constant": constant_width}


def widths_for_budget(depth: int, budget: int, min_width: int = 8, shape: str = "funnel") -> tuple[int, ...]:
    """Hidden widths of `shape` ("funnel": halving, the text's 256-128-64; "constant": every hidden layer
    equally wide) with `depth` Linear layers whose parameter count is closest to `budget`. Depth 1
    (softmax regression) has no hidden layer and one size: 7,850 parameters."""
    if shape not in SHAPES:
        raise UsageError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    widths = SHAPES[shape]
    if depth <= 1:
        return ()
    lo, hi = min_width, max(min_width, budget)  # count_params grows with the first width
    while lo < hi:
        mid = (lo + hi) // 2
        if count_params(widths(depth, mid, min_width)) < budget:
            lo = mid + 1
        else:
            hi = mid
    candidates = [widths(depth, w, min_width) for w in (max(min_width, lo - 1), lo)]
    return min(candidates, key=lambda h: abs(count_params(h) - budget))


def funnel_for_budget(depth: int, budget: int, min_width: int = 8) -> tuple[int, ...]:
    """The halving funnel of `depth` Linear layers whose parameter count is closest to `budget`."""
    return widths_for_budget(depth, budget, min_width, "funnel")
