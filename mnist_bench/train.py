"""The one trainer every part of mnist-bench uses: explicit config in, result object out.

It never sees argparse or Optuna objects. A study reports and prunes through `on_epoch`, a plain
callable that receives each epoch's metrics and returns True to stop. Same config and threads on
the CPU give bit-identical results (parameters are re-initialised from `seed` inside `train`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import MNIST
from .errors import UsageError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "linear")  # linear: the step size decays to zero over the run, step by step
DIVERGENCE_CHECK_EVERY = 50  # steps between finite-loss checks (each check syncs the device)


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the source text's recipe: plain SGD, lr 0.03, batch 64, 2 epochs."""

    lr: float = 0.03  # step size per batch (the loss is a batch mean)
    batch_size: int = 64
    epochs: int = 2
    optimizer: str = "sgd"  # "sgd" or "adam"
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0  # L2 coefficient, coupled (torch's weight_decay)
    schedule: str = "constant"  # or "linear": lr * (1 - t/T) at step t of T, so the run ends at rest
    seed: int = 0  # parameter init and batch order
    threads: int = 1  # CPU intra-op threads; 1 per worker avoids OpenMP contention on few cores
    eval_batch_size: int = 10_000

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive, got {self.lr}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (self.eval_batch_size >= 1, f"eval batch size must be >= 1, got {self.eval_batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float  # mean over the epoch's samples
    val_loss: float | None  # None when there is no validation split
    val_accuracy: float | None
    train_seconds: float  # cumulative training time at the end of this epoch (evaluation excluded)
    test_accuracy: float | None = None  # only with train(test_each_epoch=True): nothing is selected on it


@dataclass
class TrainResult:
    epochs: list[EpochMetrics] = field(default_factory=list)
    test_loss: float | None = None
    test_accuracy: float | None = None
    train_seconds: float = 0.0  # training steps only, evaluation excluded
    samples_seen: int = 0
    diverged: bool = False  # a NaN/inf training loss stopped the run
    stopped: bool = False  # on_epoch asked to stop (a pruned trial)
    interrupted: bool = False  # should_stop() asked to stop mid-epoch (Ctrl-C); nothing evaluated after it

    @property
    def samples_per_s(self) -> float:
        return self.samples_seen / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def best_val_accuracy(self) -> float | None:
        accs = [e.val_accuracy for e in self.epochs if e.val_accuracy is not None]
        return max(accs) if accs else None


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, foreach=True
    )


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """Per-step learning-rate schedule; None for a constant rate. Linear: lr * (1 - t/T), T the run's steps,
    so the last step is taken at lr/T and the final weights are not a snapshot of a noisy walk."""
    if config.schedule == "constant":
        return None
    total = config.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t / total))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One SGD step on a batch; returns the detached loss (no host sync). The benchmarks time exactly this."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def reset_parameters(model: nn.Module, seed: int) -> None:
    """Re-initialise every layer from `seed` (PyTorch's default init), so a run starts from scratch."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 10_000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in 0..1) over (x, y), in large batches without autograd."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        target = y[i : i + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        correct += (logits.argmax(dim=1) == target).sum()
    model.train(was_training)
    n = max(len(x), 1)
    return loss_sum.item() / n, correct.item() / n


def train(
    model: nn.Module,
    data: MNIST,
    config: TrainConfig,
    on_epoch: Callable[[EpochMetrics], bool | None] | None = None,
    evaluate_test: bool = True,
    should_stop: Callable[[], bool] | None = None,
    test_each_epoch: bool = False,
) -> TrainResult:
    """Train `model` on `data.train_*` with `config`; validate after each epoch; test at the end.

    `on_epoch(metrics)` returning True stops training (used for pruning). Set `evaluate_test=False`
    while tuning so the test split is never even computed. `should_stop()`, checked after every
    step, ends the run at once with `interrupted` set (a clean Ctrl-C). `test_each_epoch` records
    test accuracy after every epoch, for runs where nothing is tuned (a fixed recipe's learning curve).
    """
    device = data.device
    if device.type == "cpu":
        torch.set_num_threads(config.threads)
    reset_parameters(model, config.seed)
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    n = len(data.train_x)
    scheduler = make_schedule(optimizer, config, -(-n // config.batch_size))
    # Batch order is drawn on the CPU whatever the device: a seed means the same initial weights and the
    # same batches on CPU and CUDA, so runs differ across devices by floating-point rounding only.
    order_gen = torch.Generator().manual_seed(config.seed)
    result = TrainResult()
    has_val = len(data.val_x) > 0

    for epoch in range(1, config.epochs + 1):
        sync(device)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        perm = torch.randperm(n, generator=order_gen).to(device)
        for step, i in enumerate(range(0, n, config.batch_size), 1):
            idx = perm[i : i + config.batch_size]
            loss_sum += train_step(model, optimizer, data.train_x[idx], data.train_y[idx]) * len(idx)
            if scheduler is not None:
                scheduler.step()
            if step % DIVERGENCE_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
                result.diverged = True
                break
            if should_stop is not None and should_stop():
                result.interrupted = True
                break
        train_loss = loss_sum.item() / n  # syncs the device
        result.train_seconds += time.perf_counter() - start
        result.samples_seen += min(i + config.batch_size, n) if result.diverged or result.interrupted else n
        if result.interrupted:
            break
        if result.diverged or not math.isfinite(train_loss):
            result.diverged = True
            break
        val_loss, val_acc = evaluate(model, data.val_x, data.val_y, config.eval_batch_size) if has_val else (None, None)
        test_acc = evaluate(model, data.test_x, data.test_y, config.eval_batch_size)[1] if test_each_epoch else None
        metrics = EpochMetrics(epoch, train_loss, val_loss, val_acc, result.train_seconds, test_acc)
        result.epochs.append(metrics)
        if on_epoch is not None and on_epoch(metrics):
            result.stopped = True
            break

    if evaluate_test and not (result.diverged or result.interrupted):
        result.test_loss, result.test_accuracy = evaluate(model, data.test_x, data.test_y, config.eval_batch_size)
    return result
