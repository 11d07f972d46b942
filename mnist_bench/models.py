"""Softmax regression and ReLU MLPs of any depth as PyTorch modules (their sizes from widths alone: sizes).

Depth = number of Linear (weight) layers: softmax regression is depth 1, the source text's
784-256-128-64-10 MLP is depth 4 (242,762 parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from . import sizes
from .errors import UsageError
from .sizes import IN_FEATURES, N_CLASSES, SOURCE_WIDTHS


def mlp(hidden: Sequence[int] = SOURCE_WIDTHS) -> nn.Sequential:
    """784 -> hidden[0] -> ... -> 10 with ReLU between Linear layers; `hidden=()` is softmax regression.

    The model returns logits; the softmax lives in the cross-entropy loss.
    """
    if any(int(w) < 1 for w in hidden):
        raise UsageError(f"hidden widths must be positive, got {list(hidden)}")
    dims = [IN_FEATURES, *map(int, hidden), N_CLASSES]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def softmax_regression() -> nn.Sequential:
    return mlp(())


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def depth(model: nn.Module) -> int:
    return len(linears(model))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hidden_widths(model: nn.Module) -> tuple[int, ...]:
    return tuple(m.out_features for m in linears(model)[:-1])


def forward_flops(model: nn.Module) -> int:
    """sizes.forward_flops of the model's widths."""
    return sizes.forward_flops(hidden_widths(model))


def train_flops(model: nn.Module) -> int:
    """sizes.train_flops of the model's widths."""
    return sizes.train_flops(hidden_widths(model))
