"""The one trainer every part of mnist-bench uses: explicit configs in, result objects out.

It trains a *pack* of K networks of one shape in one pass (K = 1 is a pack of one: there is no other
training loop). Each network keeps its own config: seed (initialisation and batch order), learning rate,
schedule and epochs; optimizer, momentum and weight decay are the pack's. The pack's weights are
stacked, layer by layer, into (K, in, out) tensors; a step is one forward and one backward for the whole
pack, every layer one batched product (`torch.baddbmm`): networks with one batch order (one seed's band
of learning rates) read one batch per step, networks with their own orders (one rate's seeds) gather one
each.

A step has no autograd: the network is a fixed stack of linear layers and ReLUs, so the backward is
written out, three batched products a layer, and SGD's update is fused into the weight gradient's
product (it accumulates straight into the weights, or into the momentum buffer), so no gradient tensor
is written and read back. Every network's update is torch.optim.SGD's (Adam: torch's own Adam, slice by
slice) up to float32 rounding, with its own step size. An element's arithmetic does not depend on its
pack, so on the CPU a network's weights, epoch metrics and test predictions are bit-identical alone or
in any pack (tests/test_pack.py). That needs a BLAS whose products do not depend on where a slice sits
in memory: MKL in its strict reproducibility mode (MKL_CBWR, set by `mnist_bench` before the first
product), which `slices_compute_alone` checks once per process; where it fails, a pack trains one
network at a time. On CUDA other pack sizes may pick other kernels: the same pack reproduces, another
may differ in rounding.
Measured in results/throughput.csv (`python -m mnist_bench.throughput`).

The trainer never sees argparse or Optuna objects. A study reports and prunes through `on_epoch`,
plain callables that receive each epoch's metrics and return True to stop that network; a network
that diverges, is stopped or is interrupted (`should_stop`) leaves the pack, and the others go on.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adam import adam as torch_adam  # torch.optim.Adam's arithmetic, as a function

from .data import MNIST
from .errors import UsageError
from .models import linears

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

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """The step size of 0-based `step` (torch's LambdaLR arithmetic: lr * max(0, 1 - t/T))."""
        if self.schedule == "constant":
            return self.lr
        return self.lr * max(0.0, 1.0 - step / (self.epochs * steps_per_epoch))


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float  # mean over the epoch's samples
    val_loss: float | None  # None when there is no validation split
    val_accuracy: float | None
    train_seconds: float  # cumulative share of training time at the end of this epoch (see TrainResult)
    test_accuracy: float | None = None  # only with train(test_each_epoch=True): nothing is selected on it
    val_correct: int | None = None  # validation images classified correctly (val_accuracy = this / their number)
    test_correct: int | None = None  # as test_accuracy


class Evaluation(NamedTuple):
    """A network over one split: its mean loss, how many images it classified correctly (the exact figure;
    accuracy is derived from it) and its predicted class of each image."""

    loss: float
    correct: int
    images: int
    predictions: torch.Tensor  # uint8, on the CPU

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.images, 1)


@dataclass
class TrainResult:
    epochs: list[EpochMetrics] = field(default_factory=list)
    test_loss: float | None = None
    test_accuracy: float | None = None
    test_correct: int | None = None  # test images classified correctly: test_accuracy = test_correct / test_images
    test_images: int = 0
    test_predictions: torch.Tensor | None = None  # predicted class of each test image (uint8, on the CPU)
    # Its share of its pack's training time (the pack's wall time divided among the networks in it while
    # they trained; alone, the wall time of its steps), evaluation excluded: shares add up to wall time.
    train_seconds: float = 0.0
    samples_seen: int = 0
    pack: int = 1  # networks in the pack when it started
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


def reset_parameters(model: nn.Module, seed: int) -> None:
    """Re-initialise every layer from `seed` (PyTorch's default init), so a run starts from scratch."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape_of(model: nn.Module) -> tuple[tuple[int, int], ...]:
    return tuple((m.in_features, m.out_features) for m in linears(model))


def forward(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's input (ReLU applied) and, last, the logits (K, B, 10) of a pack whose weights are stacked
    transposed, (K, in, out), so every product and its weight gradient is a plain batched product of contiguous
    blocks (no transposed copy per step). `x` is (B, 784), one batch for every network, or (K, B, 784), a batch
    each."""
    outputs = [x.expand(len(weights[0]), *x.shape) if x.dim() == 2 else x]
    for i, (w, b) in enumerate(zip(weights, biases)):
        z = torch.baddbmm(b.unsqueeze(1), outputs[-1], w)
        outputs.append(z.relu_() if i < len(weights) - 1 else z)
    return outputs


def relu_backward(grad: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The gradient through a ReLU from its output: `grad` where the output is positive, else 0 (the kernel
    autograd runs for it: one pass, no float copy of a mask)."""
    return torch.ops.aten.threshold_backward(grad, output, 0.0)


class Pack:
    """K networks of one shape as stacked tensors, weights transposed, (K, in, out). A step is one forward and
    one hand-written backward for the whole pack (no autograd: the network is a fixed stack of linear layers
    and ReLUs, so its gradient is three batched products a layer). SGD's update is fused into the weight
    gradient's product: the product accumulates straight into the weights (plain SGD) or into the momentum
    buffer (`baddbmm_`), so no gradient tensor is written and read back. Each network keeps its own step size;
    an element's arithmetic never depends on the pack. Adam runs torch's own Adam on each network's slice.
    `step` is the unit the benchmarks time."""

    def __init__(self, models: Sequence[nn.Module], configs: Sequence[TrainConfig], device: torch.device):
        if len({shape_of(m) for m in models}) != 1:
            raise UsageError("a pack trains networks of one shape")
        if len({(c.optimizer, c.momentum, c.weight_decay) for c in configs}) != 1:
            raise UsageError("the networks of a pack share their optimizer, momentum and weight decay")
        layers = [linears(m) for m in models]
        depth = len(layers[0])
        with torch.no_grad():
            self.weights = [torch.stack([ls[i].weight.t() for ls in layers]).to(device) for i in range(depth)]
            self.biases = [torch.stack([ls[i].bias for ls in layers]).to(device) for i in range(depth)]
        self.configs = list(configs)
        self.device = device
        first = self.configs[0]
        self.momentum, self.weight_decay = first.momentum, first.weight_decay
        # SGD with momentum or weight decay keeps a buffer per parameter (stacked): torch's momentum buffer,
        # which with momentum 0 holds this step's gradient
        self.buffers: list[torch.Tensor] | None = None
        if first.optimizer == "sgd" and (self.momentum or self.weight_decay):
            self.buffers = [torch.zeros_like(p) for p in self.parameters()]
        self.adam: list[dict] = [{} for _ in configs]  # Adam's state, one network at a time

    def parameters(self) -> list[torch.Tensor]:
        return [*self.weights, *self.biases]

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, lrs: Sequence[float]) -> torch.Tensor:
        """One training step of every network: (K,) mean batch losses (no host sync). `x` is (B, 784) with
        `y` (B,) for one shared batch, or (K, B, 784) with `y` (K, B); `lrs` the step sizes.

        The backward runs from the last layer down; each layer's upstream gradient is taken before that
        layer's weights change, so the update is the one torch.optim.SGD/Adam makes after a full backward."""
        k, depth = len(self.configs), len(self.weights)
        inputs = forward(self.weights, self.biases, x)
        logits = inputs.pop()
        batch = logits.shape[1]
        target = (y.expand(k, batch) if y.dim() == 1 else y).unsqueeze(2)
        log_p = torch.log_softmax(logits, dim=2)
        losses = log_p.gather(2, target).squeeze(2).mean(1).neg_()  # F.cross_entropy, one mean per network
        grad = log_p.exp_().scatter_add_(2, target, torch.full_like(target, -1, dtype=log_p.dtype)).div_(batch)
        rates = torch.tensor(lrs, dtype=logits.dtype, device=self.device).neg_().view(k, 1, 1)  # -lr each
        uses_adam = self.configs[0].optimizer == "adam"
        weight_grads: list[torch.Tensor] = [grad] * depth  # Adam's gradients, layer by layer
        bias_grads: list[torch.Tensor] = [grad] * depth
        for i in reversed(range(depth)):
            a = inputs[i]
            upstream = relu_backward(torch.bmm(grad, self.weights[i].transpose(1, 2)), a) if i else grad
            if uses_adam:
                weight_grads[i], bias_grads[i] = torch.bmm(a.transpose(1, 2), grad), grad.sum(1)
            else:
                self.sgd(i, a, grad, rates)
            grad = upstream
        if uses_adam:
            grads = [*weight_grads, *bias_grads]
            for j, (config, state, lr) in enumerate(zip(self.configs, self.adam, lrs)):
                adam(config, state, [p[j] for p in self.parameters()], [g[j] for g in grads], lr)
        return losses

    def sgd(self, i: int, a: torch.Tensor, grad: torch.Tensor, rates: torch.Tensor) -> None:
        """torch.optim.SGD's update of layer `i` (dampening 0, no Nesterov) from its input `a` and the gradient
        `grad` of the loss at its output: g = a^T grad + wd * p; buf = momentum * buf + g; p = p - lr * buf."""
        w, b = self.weights[i], self.biases[i]
        if self.buffers is None:  # plain SGD: p = p - lr * g, the product accumulating into the weights
            step = grad * rates
            w.baddbmm_(a.transpose(1, 2), step)
            b.add_(step.sum(1))
            return
        w_buf, b_buf = self.buffers[i], self.buffers[len(self.weights) + i]
        w_buf.baddbmm_(a.transpose(1, 2), grad, beta=self.momentum)
        b_buf.mul_(self.momentum).add_(grad.sum(1))
        if self.weight_decay:
            w_buf.add_(w, alpha=self.weight_decay)
            b_buf.add_(b, alpha=self.weight_decay)
        w.addcmul_(w_buf, rates)
        b.addcmul_(b_buf, rates.view(-1, 1))

    def keep(self, indices: Sequence[int]) -> None:
        """Drop every network but `indices` (in that order) from the pack."""
        index = torch.tensor(list(indices), device=self.device)
        with torch.no_grad():
            self.weights = [w.index_select(0, index) for w in self.weights]
            self.biases = [b.index_select(0, index) for b in self.biases]
            if self.buffers is not None:
                self.buffers = [m.index_select(0, index) for m in self.buffers]
        self.configs = [self.configs[i] for i in indices]
        self.adam = [self.adam[i] for i in indices]

    @torch.no_grad()
    def evaluate(self, i: int, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Evaluation:
        """Network `i` over (x, y), computed as a pack of one, so the figures do not depend on the pack."""
        weights = [w[i : i + 1] for w in self.weights]
        biases = [b[i : i + 1] for b in self.biases]
        loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
        predictions = []
        for j in range(0, len(x), batch_size):
            logits = forward(weights, biases, x[j : j + batch_size])[-1][0]
            loss_sum += F.cross_entropy(logits, y[j : j + batch_size], reduction="sum").double()
            predictions.append(logits.argmax(dim=1))
        predicted = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long, device=x.device)
        correct = int((predicted == y).sum().item())
        return Evaluation(loss_sum.item() / max(len(x), 1), correct, len(x), predicted.to("cpu", torch.uint8))

    def write_back(self, i: int, model: nn.Module) -> None:
        """Copy network `i`'s weights into `model` (same shape)."""
        with torch.no_grad():
            for layer, w, b in zip(linears(model), self.weights, self.biases):
                layer.weight.copy_(w[i].t())
                layer.bias.copy_(b[i])


def adam(config: TrainConfig, state: dict, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
    """One Adam step of one network on views of the pack's tensors: torch.optim.Adam's arithmetic
    (foreach, betas 0.9 and 0.999, eps 1e-8, coupled weight decay)."""
    for key in ("exp_avgs", "exp_avg_sqs"):
        state.setdefault(key, [torch.zeros_like(p) for p in params])
    steps = state.setdefault("steps", [torch.zeros((), dtype=torch.float32) for _ in params])
    torch_adam(
        params,
        grads,
        state["exp_avgs"],
        state["exp_avg_sqs"],
        [],
        steps,
        foreach=True,
        amsgrad=False,
        beta1=0.9,
        beta2=0.999,
        lr=lr,
        weight_decay=config.weight_decay,
        eps=1e-8,
        maximize=False,
    )


@dataclass
class _Run:
    """A network's bookkeeping while its pack trains."""

    index: int  # position in the caller's lists
    config: TrainConfig
    data: MNIST
    order: torch.Generator  # its batch order, drawn on the CPU whatever the device
    result: TrainResult
    perm: torch.Tensor | None = None  # this epoch's batch order
    loss_sum: torch.Tensor | None = None


@functools.cache
def slices_compute_alone() -> bool:
    """Whether a batched product on the CPU computes each slice exactly as the same slice copied out and
    computed alone, on shapes whose slices sit at every alignment (odd widths; the forward product and a
    weight gradient's). MKL without its strict mode fails this; checked once per process."""
    g = torch.Generator().manual_seed(0)
    for k, b, n, p in ((3, 64, 235, 10), (7, 50, 47, 11), (5, 16, 131, 67)):
        a, grad, w = (
            torch.randn(k, b, n, generator=g),
            torch.randn(k, b, p, generator=g),
            torch.randn(k, n, p, generator=g),
        )
        forward_all, gradient_all = torch.bmm(a, w), torch.bmm(a.transpose(1, 2), grad)
        update_all = w.clone().baddbmm_(a.transpose(1, 2), grad, beta=0.9)  # the fused update
        for i in range(k):
            alone = a[i : i + 1].clone()  # a fresh allocation, as a network trained alone has
            if not torch.equal(forward_all[i], torch.bmm(alone, w[i : i + 1].clone())[0]):
                return False
            if not torch.equal(gradient_all[i], torch.bmm(alone.transpose(1, 2), grad[i : i + 1].clone())[0]):
                return False
            update = w[i : i + 1].clone().baddbmm_(alone.transpose(1, 2), grad[i : i + 1], beta=0.9)
            if not torch.equal(update_all[i], update[0]):
                return False
    return True


def train(
    model: nn.Module,
    data: MNIST,
    config: TrainConfig,
    on_epoch: Callable[[EpochMetrics], bool | None] | None = None,
    evaluate_test: bool = True,
    should_stop: Callable[[], bool] | None = None,
    test_each_epoch: bool = False,
) -> TrainResult:
    """Train one network: a pack of one (see train_pack)."""
    return train_pack(
        [model],
        data,
        [config],
        on_epoch=None if on_epoch is None else [on_epoch],
        evaluate_test=evaluate_test,
        should_stop=None if should_stop is None else [should_stop],
        test_each_epoch=test_each_epoch,
    )[0]


def train_pack(
    models: Sequence[nn.Module],
    data: MNIST | Sequence[MNIST],
    configs: Sequence[TrainConfig],
    on_epoch: Sequence[Callable[[EpochMetrics], bool | None] | None] | None = None,
    evaluate_test: bool = True,
    should_stop: Sequence[Callable[[], bool] | None] | None = None,
    test_each_epoch: bool = False,
) -> list[TrainResult]:
    """Train `models` (one shape) on their `data` (one for all, or one each) with their `configs`; validate
    each after every epoch; test each at its end. Each model is re-initialised from its config's seed,
    and its trained weights are written back into it. Returns one result per model, in order.

    `on_epoch[i](metrics)` returning True stops network i (pruning). `evaluate_test=False` while tuning,
    so the test split is never even computed. `should_stop[i]()`, checked after every step, ends network
    i at once with `interrupted` set (a clean Ctrl-C). `test_each_epoch` records test accuracy after
    every epoch, for runs where nothing is tuned (a fixed recipe's learning curve). Networks with the
    same seed and data share each step's batch; batch size and threads are the pack's.
    """
    k = len(models)
    datas = list(data) if isinstance(data, Sequence) else [data] * k
    if not k or len(configs) != k or len(datas) != k:
        raise UsageError(f"a pack needs one config and one data set per model: {k} models, {len(configs)} configs")
    if len({(c.batch_size, c.threads, c.eval_batch_size) for c in configs}) != 1:
        raise UsageError("the networks of a pack share their batch size, threads and evaluation batch size")
    if len({len(d.train_x) for d in datas}) != 1 or len({d.device for d in datas}) != 1:
        raise UsageError("the networks of a pack train on as many images each, on one device")
    device, batch, n = datas[0].device, configs[0].batch_size, len(datas[0].train_x)
    if device.type == "cpu":
        torch.set_num_threads(configs[0].threads)
        if k > 1 and not slices_compute_alone():
            warnings.warn(
                "this BLAS computes a slice of a batched product differently from the slice alone (for MKL, set "
                "MKL_CBWR=AUTO,STRICT before the first matrix product): training the pack one network at a time",
                RuntimeWarning,
                stacklevel=2,
            )
            return [
                train_pack([m], [d], [c], [e], evaluate_test, [s], test_each_epoch)[0]
                for m, d, c, e, s in zip(models, datas, configs, on_epoch or [None] * k, should_stop or [None] * k)
            ]
    for model, config in zip(models, configs):
        reset_parameters(model, config.seed)
    pack = Pack(models, configs, device)
    on_epoch = list(on_epoch or [None] * k)
    should_stop = list(should_stop or [None] * k)
    results = [TrainResult(pack=k) for _ in range(k)]
    runs = [
        _Run(i, c, d, torch.Generator().manual_seed(c.seed), results[i]) for i, (c, d) in enumerate(zip(configs, datas))
    ]
    steps_per_epoch = -(-n // batch)
    step = 0

    def leave(gone: dict[int, str]) -> None:
        """Networks at these positions leave the pack (their weights written back), flagged as given."""
        nonlocal runs
        for j, why in gone.items():
            if why:
                setattr(runs[j].result, why, True)
            pack.write_back(j, models[runs[j].index])
        kept = [j for j in range(len(runs)) if j not in gone]
        if kept:
            pack.keep(kept)
        runs = [runs[j] for j in kept]

    mark = 0.0

    def charge() -> None:
        """Share the pack's training time since `mark` among the networks in it (shares sum to wall time)."""
        nonlocal mark
        now = elapsed(device)
        for r in runs:
            r.result.train_seconds += (now - mark) / len(runs)
        mark = now

    for epoch in range(1, max(c.epochs for c in configs) + 1):
        if not runs:
            break
        for r in runs:  # every network draws its own order, so its stream never depends on its pack
            r.perm = torch.randperm(n, generator=r.order).to(device)
            r.loss_sum = torch.zeros((), device=device)
        mark = elapsed(device)
        for i in range(0, n, batch):
            x, y = batch_of(runs, i, batch)
            losses = pack.step(x, y, [r.config.lr_at(step, steps_per_epoch) for r in runs]) * x.shape[-2]
            step += 1
            gone: dict[int, str] = {}
            for j, r in enumerate(runs):
                r.loss_sum += losses[j]
                stop = should_stop[r.index]
                if stop is not None and stop():
                    gone[j] = "interrupted"
            if step % DIVERGENCE_CHECK_EVERY == 0:
                finite = torch.isfinite(torch.stack([r.loss_sum for r in runs])).tolist()
                gone |= {j: "diverged" for j, ok in enumerate(finite) if not ok and j not in gone}
            if gone:
                charge()
                for j in gone:
                    runs[j].result.samples_seen += min(i + batch, n)
                leave(gone)
                if not runs:
                    break
        if not runs:
            break
        charge()
        losses = torch.stack([r.loss_sum for r in runs]).tolist()
        gone = {}
        for j, (r, loss) in enumerate(zip(runs, losses)):
            r.result.samples_seen += n
            if not math.isfinite(loss):
                gone[j] = "diverged"
                continue
            d, c = r.data, r.config
            val = pack.evaluate(j, d.val_x, d.val_y, c.eval_batch_size) if len(d.val_x) else None
            test = pack.evaluate(j, d.test_x, d.test_y, c.eval_batch_size) if test_each_epoch else None
            metrics = EpochMetrics(
                epoch,
                loss / n,
                None if val is None else val.loss,
                None if val is None else val.accuracy,
                r.result.train_seconds,
                None if test is None else test.accuracy,
                None if val is None else val.correct,
                None if test is None else test.correct,
            )
            r.result.epochs.append(metrics)
            callback = on_epoch[r.index]
            if callback is not None and callback(metrics):
                gone[j] = "stopped"
            elif epoch == c.epochs:
                gone[j] = ""
            if j in gone and evaluate_test:
                test = pack.evaluate(j, d.test_x, d.test_y, c.eval_batch_size)
                r.result.test_loss, r.result.test_accuracy = test.loss, test.accuracy
                r.result.test_correct, r.result.test_images, r.result.test_predictions = (
                    test.correct,
                    test.images,
                    test.predictions,
                )
        if gone:
            leave(gone)
    return results


def batch_of(runs: Sequence[_Run], i: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's images and labels: one (B, 784) batch when every network shares its seed and data (the
    same order), else one batch each, (K, B, 784)."""
    first = runs[0]
    if all(r.config.seed == first.config.seed and r.data is first.data for r in runs):
        idx = first.perm[i : i + batch]
        return first.data.train_x.index_select(0, idx), first.data.train_y.index_select(0, idx)
    if all(r.data is first.data for r in runs):
        idx = torch.cat([r.perm[i : i + batch] for r in runs])
        x, y = first.data.train_x.index_select(0, idx), first.data.train_y.index_select(0, idx)
        return x.view(len(runs), -1, x.shape[-1]), y.view(len(runs), -1)
    x = torch.stack([r.data.train_x[r.perm[i : i + batch]] for r in runs])
    y = torch.stack([r.data.train_y[r.perm[i : i + batch]] for r in runs])
    return x, y


def elapsed(device: torch.device) -> float:
    """A clock reading after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()
