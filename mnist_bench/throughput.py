"""Training-step throughput: the harness against the source text's input pipeline, against the peak,
and packs of K networks against K separate runs.

Times the trainer's step (`train.Pack.step`: forward, loss, backward, SGD step; a pack of one is how
a single network trains) on a batch drawn by indexing the on-device dataset, for softmax and the
256-128-64-32 funnel cut to depth 3, 4 and 5, over batch sizes 64..4096, on every device (CPU with 1
thread and with all cores; CUDA where present). Each figure is the median of several repeats after
warm-up, synchronised on CUDA. Beside it: achieved GFLOP/s (training FLOPs per sample x samples/s)
and the peak GFLOP/s of a large float32 matrix product measured in the same run, device and thread
count. The source pipeline (torchvision `datasets.MNIST` + `ToTensor` per item +
`DataLoader(batch_size=64, shuffle=True)`) is timed on the same models in the same run, so every
figure has a ratio beside it.

Packs (pipeline "pack"): K copies of the text's depth-4 network at batch 64 trained in one pass, with
one shared batch order (a band of learning rates at one seed) or a batch order each (one rate's seeds),
K in 1, 3, 6, 12, 24. Model-samples per second (K x batch / step time) is timed alternately with the
pack of one in the same process, round after round, and `speedup` is the median of the rounds' ratios:
a ratio taken in one run, robust to a machine whose speed drifts.

    python -m mnist_bench.throughput            # full sweep, a few minutes on 2 cores
    python -m mnist_bench.throughput --quick    # under two minutes on 2 cores
"""

from __future__ import annotations

from mnist_bench import cli

cli.starting(__name__)

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .data import FILES, MNIST, RAW_FOLDERS, find_file, load_mnist, read_verified, resolve_device
from .env import environment
from .errors import UsageError, UserError
from .interrupt import Interrupted
from .models import mlp, train_flops
from .paths import default_data_dir
from .sizes import funnel_widths
from .train import Pack, TrainConfig, sync

DEPTHS = (1, 3, 4, 5)  # softmax and the funnel cut to depth
BATCH_SIZES = (64, 256, 1024, 4096)
SOURCE_BATCH = 64  # the source text's DataLoader batch size
LR = 0.03
PACKS = (1, 3, 6, 12, 24)  # networks per pack
PACK_DEPTH = 4  # the text's network


@dataclass(frozen=True)
class Timing:
    """How long to measure: warm-up excluded, then `repeats` timed blocks of at least `min_seconds`."""

    warmup_seconds: float = 0.3
    min_seconds: float = 0.5
    repeats: int = 5


QUICK = Timing(warmup_seconds=0.1, min_seconds=0.12, repeats=3)


def median_seconds_per_call(fn: Callable[[], object], device: torch.device, timing: Timing) -> float:
    """Median over repeats of wall time per call of `fn`, after warm-up, with device synchronisation."""
    sync(device)
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < timing.warmup_seconds or calls < 3:
        fn()
        calls += 1
        sync(device)
    per_call = (time.perf_counter() - start) / calls
    n = max(1, int(timing.min_seconds / max(per_call, 1e-7)))
    samples = []
    for _ in range(timing.repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def peak_gflops(device: torch.device, timing: Timing, size: int | None = None) -> float:
    """GFLOP/s of a large float32 matrix product (the roofline's compute ceiling for this setting)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds = median_seconds_per_call(lambda: torch.mm(a, b), device, timing)
    return 2 * size**3 / seconds / 1e9


def source_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The source text's step: an nn.Module, torch.optim.SGD, a batch-mean cross-entropy."""
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


class HarnessStep:
    """One training step as the trainer takes it, for a pack of `pack` networks of the funnel cut to
    `depth`: slice a per-epoch permutation (one shared, or one per network), index the on-device tensor."""

    def __init__(
        self, depth: int, batch_size: int, data: MNIST, seed: int = 0, pack: int = 1, shared: bool = False
    ) -> None:
        torch.manual_seed(seed)
        models = [mlp(funnel_widths(depth)) for _ in range(pack)]
        self.pack = Pack(models, [TrainConfig(lr=LR, batch_size=batch_size)] * pack, data.device)
        self.lrs = [LR] * pack
        self.x, self.y = data.train_x, data.train_y
        self.batch_size, self.orders = batch_size, 1 if shared or pack == 1 else pack
        self.gen = torch.Generator(device=data.device).manual_seed(seed)
        self.device = data.device
        self.flops_per_sample = train_flops(models[0])
        self.perm, self.pos = self.new_epoch(), 0

    def new_epoch(self) -> torch.Tensor:
        n = len(self.x)
        return torch.stack([torch.randperm(n, device=self.device, generator=self.gen) for _ in range(self.orders)])

    def __call__(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.perm.shape[1]:
            self.perm, self.pos = self.new_epoch(), 0
        idx = self.perm[:, self.pos : self.pos + self.batch_size].reshape(-1)
        self.pos += self.batch_size
        x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        if self.orders > 1:
            x, y = x.view(self.orders, self.batch_size, -1), y.view(self.orders, self.batch_size)
        return self.pack.step(x, y, self.lrs)

    def steps(self, n: int) -> torch.Tensor:
        """`n` steps then a device sync: the unit pytest-benchmark times."""
        for _ in range(n):
            loss = self()
        sync(self.device)
        return loss


def paired_seconds(
    a: Callable[[], object], b: Callable[[], object], device: torch.device, timing: Timing
) -> tuple[float, float]:
    """(median seconds per call of a, median of the per-round ratios a/b), timed alternately round
    after round after a warm-up of each (a then b in even rounds, b then a in odd ones, so neither always
    runs on the caches the other left), so both see the same machine."""
    for fn in (a, b):
        median_seconds_per_call(fn, device, Timing(timing.warmup_seconds, timing.min_seconds / 4, 1))
    rounds = []
    for r in range(2 * max(timing.repeats, 4)):
        order = (a, b) if r % 2 == 0 else (b, a)
        seconds = {id(fn): median_seconds_per_call(fn, device, Timing(0.0, timing.min_seconds, 1)) for fn in order}
        rounds.append((seconds[id(a)], seconds[id(b)]))
    return statistics.median(r[0] for r in rounds), statistics.median(x / y for x, y in rounds)


def torchvision_root(data_dir: Path | None, root: Path, dataset: str = "mnist") -> Path:
    """Lay the verified pinned files out as torchvision expects (`root/MNIST/raw`, decompressed)."""
    raw = root / RAW_FOLDERS[dataset] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    src = Path(data_dir) if data_dir else default_data_dir(dataset)
    for name in FILES:
        (raw / name).write_bytes(read_verified(find_file(src, name, dataset), name, dataset))
    return root


class SourceStep:
    """The source text's loop: DataLoader over torchvision MNIST with ToTensor, batch 64, shuffled."""

    def __init__(self, depth: int, root: Path, device: torch.device, seed: int = 0, dataset_name: str = "mnist"):
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        torch.manual_seed(seed)
        cls = getattr(datasets, RAW_FOLDERS[dataset_name])
        dataset = cls(str(root), train=True, download=False, transform=transforms.ToTensor())
        self.loader = DataLoader(dataset, batch_size=SOURCE_BATCH, shuffle=True)
        self.iterator = iter(self.loader)
        self.model = mlp(funnel_widths(depth)).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, foreach=True)
        self.device = device
        self.flops_per_sample = train_flops(self.model)

    def __call__(self) -> torch.Tensor:
        try:
            x, y = next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            x, y = next(self.iterator)
        x, y = x.view(-1, 28 * 28).to(self.device), y.to(self.device)
        return source_step(self.model, self.optimizer, x, y)


def row(
    pipeline: str,
    depth: int,
    batch_size: int,
    device: torch.device,
    threads: int,
    seconds: float,
    flops_per_sample: int,
    peak: float,
    pack: int = 1,
    batch_order: str = "",
    speedup: float | None = None,
) -> dict:
    samples_per_s = pack * batch_size / seconds  # model-samples: every network of a pack counts
    gflops = flops_per_sample * samples_per_s / 1e9
    return {
        "pipeline": pipeline,
        "pack": pack,
        "batch_order": batch_order,  # packs: "shared" (one order for all) or "separate" (one each)
        "model": "softmax" if depth == 1 else f"mlp{depth}",
        "depth": depth,
        "widths": "-".join(map(str, funnel_widths(depth))),
        "batch_size": batch_size,
        "samples_per_s": samples_per_s,
        "ms_per_step": 1e3 * seconds,
        "train_flops_per_sample": flops_per_sample,
        "gflops": gflops,
        "peak_gflops": peak,
        "fraction_of_peak": gflops / peak,
        "speedup": speedup,  # packs: model-samples/s over the pack of one's, timed alternately in this run
        **environment(device, threads),
    }


def settings(
    devices: list[torch.device],
    thread_counts: list[int],
    timing: Timing,
    data_dir: Path | None,
    dataset: str,
    log: Callable[[str], None],
) -> Iterator[tuple[MNIST, torch.device, int, float]]:
    """(data, device, threads, matmul peak) for every device and thread count, the threads set and the peak
    measured and logged before each."""
    for device in devices:
        data = load_mnist(data_dir, val_size=0, device=device, dataset=dataset)
        for threads in thread_counts if device.type == "cpu" else [1]:
            torch.set_num_threads(threads)
            peak = peak_gflops(device, timing)
            log(f"{device.type} {threads} thread(s): float32 matmul peak {peak:.1f} GFLOP/s")
            yield data, device, threads, peak


def sweep(
    devices: list[torch.device],
    thread_counts: list[int],
    timing: Timing,
    data_dir: Path | None,
    packs: tuple[int, ...] = PACKS,
    log: Callable[[str], None] = print,
    dataset: str = "mnist",
    only_packs: bool = False,
) -> pd.DataFrame:
    """Every setting timed (`only_packs`: the pack rows alone); the images' values do not matter to a step's
    time (both datasets have the same shapes), so `dataset` only says which pinned files feed it."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = None if only_packs else torchvision_root(data_dir, Path(tmp), dataset)
        for data, device, threads, peak in settings(devices, thread_counts, timing, data_dir, dataset, log):
            for depth in () if only_packs else DEPTHS:
                for batch in BATCH_SIZES:
                    step = HarnessStep(depth, batch, data)
                    seconds = median_seconds_per_call(step, device, timing)
                    rows.append(row("harness", depth, batch, device, threads, seconds, step.flops_per_sample, peak))
                source = SourceStep(depth, root, device, dataset_name=dataset)
                seconds = median_seconds_per_call(source, device, timing)
                rows.append(
                    row(
                        "source-dataloader",
                        depth,
                        SOURCE_BATCH,
                        device,
                        threads,
                        seconds,
                        source.flops_per_sample,
                        peak,
                    )
                )
                log(
                    f"  {rows[-1]['model']:8s} harness {rows[-len(BATCH_SIZES) - 1]['samples_per_s']:>10,.0f} "
                    f"samples/s at batch 64 vs source {rows[-1]['samples_per_s']:>9,.0f}"
                )
            if packs:
                rows += pack_rows(data, device, threads, timing, peak, packs, log)
            settle_peak(rows, device, threads, timing, peak, log)
    return pd.DataFrame(rows)


def settle_peak(
    rows: list[dict], device: torch.device, threads: int, timing: Timing, before: float, log: Callable[[str], None]
) -> None:
    """Measure the setting's peak again after its rows and keep the larger of the two for all of them: a ceiling
    is best estimated by its fastest measurement, and a peak timed at a moment the shared machine was busy
    would otherwise put every fraction of that setting above the truth (or above 1)."""
    after = peak_gflops(device, timing)
    peak = max(before, after)
    if after > before:
        log(f"{device.type} {threads} thread(s): float32 matmul peak {after:.1f} GFLOP/s after the rows (kept)")
    for r in rows:
        if r["device"] == device.type and r["threads"] == threads:
            r["peak_gflops"], r["fraction_of_peak"] = peak, r["gflops"] / peak


def pack_rows(
    data: MNIST,
    device: torch.device,
    threads: int,
    timing: Timing,
    peak: float,
    packs: tuple[int, ...],
    log: Callable[[str], None] = print,
) -> list[dict]:
    """The text's network at batch 64 in packs of K, shared and separate batch orders, each timed alternately
    with the pack of one (K separate runs are K times its time)."""
    rows = []
    alone = HarnessStep(PACK_DEPTH, SOURCE_BATCH, data)
    for k in packs:
        for order in ("shared", "separate") if k > 1 else ("separate",):
            step = HarnessStep(PACK_DEPTH, SOURCE_BATCH, data, pack=k, shared=order == "shared")
            seconds, ratio = paired_seconds(step, alone, device, timing)
            speedup = k / ratio  # K runs of the pack of one take K x its time
            rows.append(
                row(
                    "pack",
                    PACK_DEPTH,
                    SOURCE_BATCH,
                    device,
                    threads,
                    seconds,
                    step.flops_per_sample,
                    peak,
                    k,
                    order,
                    speedup,
                )
            )
            log(
                f"  pack of {k:2d}, {order:8s}: {rows[-1]['samples_per_s']:>9,.0f} model-samples/s, "
                f"{speedup:.2f}x of {k} separate runs, {rows[-1]['fraction_of_peak']:.0%} of peak"
            )
    return rows


def summary(df: pd.DataFrame) -> str:
    lines = []
    base = df[df["pipeline"] != "pack"]
    for (device, threads), g in base.groupby(["device", "threads"]):
        h = g[(g.pipeline == "harness") & (g.batch_size == SOURCE_BATCH)].set_index("model")["samples_per_s"]
        s = g[g.pipeline == "source-dataloader"].set_index("model")["samples_per_s"]
        ratio = (h / s).dropna()
        best = g[g.pipeline == "harness"].sort_values("fraction_of_peak").iloc[-1]
        lines.append(
            f"{device}, {threads} thread(s): harness / source at batch 64: "
            + ", ".join(f"{m} {r:.1f}x" for m, r in ratio.items())
            + f"; best fraction of matmul peak {best.fraction_of_peak:.0%} "
            f"({best.model}, batch {best.batch_size}, {best.gflops:.1f} of {best.peak_gflops:.1f} GFLOP/s)"
        )
        large = g[(g.pipeline == "harness") & (g.batch_size >= 1024) & (g.depth > 1)]
        if not large.empty:
            low, high = large.fraction_of_peak.min(), large.fraction_of_peak.max()
            lines.append(f"  MLPs at batch >= 1024: {low:.0%}-{high:.0%} of peak")
    packs = df[(df.pipeline == "pack") & (df["pack"] > 1)]
    for (device, threads), g in packs.groupby(["device", "threads"]):
        lines.append(
            f"{device}, {threads} thread(s), mlp{PACK_DEPTH} batch 64, packs over as many separate runs: "
            + ", ".join(
                f"K={r.pack} {r.batch_order} {r.speedup:.2f}x ({r.fraction_of_peak:.0%} of peak)"
                for r in g.itertuples()
            )
        )
    return "\n".join(lines)


def profile(
    depth: int, batch_size: int, threads: int, data_dir: Path | None, steps: int = 300, dataset: str = "mnist"
) -> str:
    """Where one CPU training step's time goes: torch.profiler's op table, and the matrix products' share."""
    torch.set_num_threads(threads)
    step = HarnessStep(depth, batch_size, load_mnist(data_dir, val_size=0, dataset=dataset))
    for _ in range(20):  # warm-up
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_")  # the step's: batched
    matmul = sum(e.self_cpu_time_total for e in events if e.key in products)
    return (
        events.table(sort_by="self_cpu_time_total", row_limit=12)
        + f"\nmlp{depth}, batch {batch_size}, {threads} thread(s): {total / steps / 1e3:.3f} ms profiled per step, "
        f"of which matrix products ({', '.join(products)}) {matmul / steps / 1e3:.3f} ms = {matmul / total:.0%}"
    )


def sweep_kind(path: Path) -> str | None:
    """What the table at `path` holds: "full", "quick" or "packs" (a table from before the column: full);
    None when there is none, or it is not a table of this command."""
    if not path.is_file():
        return None
    try:
        header = pd.read_csv(path, nrows=1)
    except (ValueError, OSError, UnicodeDecodeError):
        return None
    if "sweep" in header and len(header):
        return str(header["sweep"].iloc[0])
    return "full" if "samples_per_s" in header else None


def device_or_all(text: str) -> str:
    return text if text == "all" else cli.device_name(text)


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("python -m mnist_bench.throughput", __doc__)
    p.add_argument("--quick", action="store_true", help="shorter timings (whole run under two minutes on 2 cores)")
    cli.add_dataset(p)
    p.add_argument(
        "--device",
        type=device_or_all,
        default="all",
        help="all (CPU, plus CUDA where present), cpu or cuda (default: all)",
    )
    p.add_argument(
        "--threads",
        type=cli.bounded_int(1, cli.MAX_THREADS, "threads per process"),
        nargs="+",
        default=None,
        help=f"CPU thread counts to sweep (default: 1 and all cores = {os.cpu_count()})",
    )
    p.add_argument(
        "--out",
        type=cli.path_arg,
        default=None,
        help="folder for throughput.csv (default: results/ for the full sweep, results/quick/ for --quick or "
        "--only-packs, which never replace a full sweep's table)",
    )
    p.add_argument(
        "--name", type=cli.file_name, default="throughput.csv", help="file name of the table (default: throughput.csv)"
    )
    p.add_argument(
        "--packs",
        type=cli.bounded_int(1, 256, "networks per pack"),
        nargs="+",
        default=list(PACKS),
        help=f"pack sizes K timed against K separate runs (default: {' '.join(map(str, PACKS))})",
    )
    p.add_argument(
        "--only-packs", action="store_true", help="time the packs alone (no batch-size sweep, no source pipeline)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the sweep, profile the depth-4 step at batch 64 on the CPU and print where time goes",
    )
    args = p.parse_args(argv)
    if args.threads and len(set(args.threads)) != len(args.threads):
        p.error(f"--threads must be distinct, got {args.threads}")
    if args.profile:
        for threads in args.threads or [1]:
            print(profile(4, SOURCE_BATCH, threads, args.data_dir, dataset=args.dataset))
        return 0
    if args.device == "all":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [resolve_device(args.device)]
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    kind = "quick" if args.quick else "packs" if args.only_packs else "full"
    out = args.out or (cli.RESULTS_DIR if kind == "full" else cli.RESULTS_DIR / "quick")
    load_mnist(args.data_dir, val_size=0, dataset=args.dataset)  # verify the data before timing anything
    path = cli.prepare_out(out, args.name)  # and where the table goes
    if kind != "full" and sweep_kind(path) == "full":
        raise UsageError(
            f"{path} holds a full sweep; a {'--quick' if args.quick else '--only-packs'} sweep never replaces it: "
            "pass another --out or --name"
        )
    try:
        timing = QUICK if args.quick else Timing()
        packs = tuple(dict.fromkeys(args.packs))
        df = sweep(devices, threads, timing, args.data_dir, packs, dataset=args.dataset, only_packs=args.only_packs)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: nothing written ({path} is written when the sweep ends); temporary files removed"
        ) from None
    df = df.assign(sweep=kind)[["sweep", *[c for c in df.columns if c != "sweep"]]]  # full, quick, or packs alone
    print(summary(df))
    partial = None
    try:  # measurements are kept even when the table cannot take them
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".csv")  # short: any name fits
        os.close(fd)
        df.to_csv(partial, index=False)
        os.replace(partial, path)
    except OSError as e:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        fd, kept = tempfile.mkstemp(prefix="mnist-bench-throughput-", suffix=".csv")  # never over an earlier one
        os.close(fd)
        df.to_csv(kept, index=False)
        raise UserError(f"cannot write {path} ({e.strerror or e}); the measurements are in {kept}") from None
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
