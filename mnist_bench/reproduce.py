"""Re-run the source text's recipes and compare with its claims.

The text trained on all 60k training images (no hold-out) with plain SGD, lr 0.03, batch 64,
inputs scaled to [0, 1] (``ToTensor``), and reported test accuracy:
softmax regression 2 epochs 92.11%; 784-256-128-64-10 MLP about 96% after 2 epochs and 98% after 10.
Each recipe runs over several seeds; the table shows the spread, not one lucky run.

    python -m mnist_bench.reproduce --seeds 5
"""
from __future__ import annotations

from mnist_bench import cli

cli.starting(__name__)

import argparse  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from .data import load_mnist  # noqa: E402
from .env import environment  # noqa: E402
from .interrupt import Interrupted  # noqa: E402
from .models import SOURCE_WIDTHS, mlp  # noqa: E402
from .train import TrainConfig, train  # noqa: E402

MAX_SEEDS = 1_000


@dataclass(frozen=True)
class Experiment:
    name: str
    hidden: tuple[int, ...]
    epochs: int
    claimed_accuracy: float  # fraction, as stated in the source text


EXPERIMENTS = (
    Experiment("softmax-2ep", (), 2, 0.9211),
    Experiment("mlp4-2ep", SOURCE_WIDTHS, 2, 0.96),
    Experiment("mlp4-10ep", SOURCE_WIDTHS, 10, 0.98),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.Parser("python -m mnist_bench.reproduce", __doc__)
    parser.add_argument("--seeds", type=cli.bounded_int(1, MAX_SEEDS, "runs per recipe"), default=5,
                        help="seeds per recipe (default: 5)")
    parser.add_argument("--train-subset", type=cli.positive_int, default=None,
                        help="train on the first N images only (for smoke tests; default: all 60k)")
    cli.add_common(parser, "folder for reproduction.csv")
    return parser.parse_args(argv)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby("experiment", sort=False)
    return pd.DataFrame({
        "claimed": g["claimed_accuracy"].first(),
        "n": g["test_accuracy"].size(),
        "mean": g["test_accuracy"].mean(),
        "std": g["test_accuracy"].std(ddof=1),
        "min": g["test_accuracy"].min(),
        "max": g["test_accuracy"].max(),
        "train_s": g["train_seconds"].mean(),
    })


def write(rows: list[dict], path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    pd.DataFrame(rows).to_csv(partial, index=False)
    partial.replace(path)  # the table on disk is always whole: every finished run, no half row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_mnist(args.data_dir, val_size=0, device=args.device, train_subset=args.train_subset)
    path = cli.prepare_out(args.out, "reproduction.csv")  # before training: results need somewhere to go
    env = environment(data.device, args.threads)
    rows: list[dict] = []
    try:
        for exp in EXPERIMENTS:
            for seed in range(args.seeds):
                config = TrainConfig(lr=0.03, batch_size=64, epochs=exp.epochs, seed=seed, threads=args.threads)
                result = train(mlp(exp.hidden), data, config)
                rows.append({
                    "experiment": exp.name, "depth": len(exp.hidden) + 1,
                    "hidden": "-".join(map(str, exp.hidden)), "seed": seed, "epochs": exp.epochs,
                    "lr": config.lr, "batch_size": config.batch_size, "train_size": len(data.train_x),
                    "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
                    "claimed_accuracy": exp.claimed_accuracy, "train_seconds": result.train_seconds,
                    "samples_per_s": result.samples_per_s, "diverged": result.diverged, **env,
                })
                write(rows, path)
                print(f"{exp.name:12s} seed {seed}: test accuracy {result.test_accuracy:.4f} "
                      f"({result.train_seconds:.1f} s)", flush=True)
    except KeyboardInterrupt:
        kept = f"the {len(rows)} finished runs are in {path}" if rows else f"no run finished; {path} is untouched"
        raise Interrupted(f"interrupted: {kept}") from None
    print()
    print(summarise(pd.DataFrame(rows)).to_string(float_format=lambda v: f"{v:.4f}", na_rep="n/a"))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
