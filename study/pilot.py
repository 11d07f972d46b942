"""The pilot that sets the full study's number of seeds (docs/method.md, "Seeds from the question").

At the text's budget (242,762 parameters, halving funnel), depths 3, 4 and 5 train with the matched
experiment's fixed hyperparameters (momentum 0.9, batch 64, 10 epochs, the learning rate decaying
linearly to zero from a peak of 0.0316) for seeds 1..K on the validation split; the spread of the
per-seed differences of depth 4 minus 3 and minus 5 then gives the paired seeds that would find a
difference of the margin, or show a difference of 0 equivalent, with 80% power at the strictest
level of the primary Holm family.

    python -m study.pilot                      # MNIST, 6 seeds: about 3 minutes on 2 CPU cores
    python -m study.pilot --dataset fashion-mnist --seeds 4
    python -m study.pilot --dataset fashion-mnist --epochs 20 40 --seeds 3   # the horizon: how many epochs

With several --epochs, every depth and seed trains once per horizon (same seed: same initialisation, batch
order and hold-out) and the pilot prints each depth's test accuracy gain from one horizon to the next, per
seed: the "late gain" the method page sets the epochs by (under a quarter of the margin).
"""

from __future__ import annotations

from mnist_bench import cli

cli.starting(__name__)

import multiprocessing

from .config import DECLARED_MARGINS, SOURCE_PARAMS, full_design

PEAK_LR = 0.0316
DEPTHS = (3, 4, 5)


def _run(job: tuple[str, int, int, int]) -> tuple[int, int, int, float]:
    import torch

    from mnist_bench.data import load_mnist
    from mnist_bench.models import mlp
    from mnist_bench.sizes import widths_for_budget
    from mnist_bench.train import TrainConfig, train

    dataset, depth, seed, epochs = job
    torch.set_num_threads(1)
    cfg = full_design(dataset)
    data = load_mnist(None, val_size=cfg.val_size, split_seed=cfg.final_split(seed), dataset=dataset)
    widths = widths_for_budget(depth, SOURCE_PARAMS, cfg.matched.min_width)
    config = TrainConfig(lr=PEAK_LR, epochs=epochs, momentum=cfg.momentum, schedule=cfg.schedule, seed=seed, threads=1)
    return depth, seed, epochs, train(mlp(widths), data, config).test_accuracy


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("python -m study.pilot", __doc__)
    cli.add_dataset(p)
    p.add_argument("--seeds", type=cli.bounded_int(2, 100, "seeds"), default=6, help="seeds per depth (default: 6)")
    p.add_argument("--workers", type=cli.bounded_int(1, 64, "processes"), default=2, help="processes (default: 2)")
    p.add_argument(
        "--epochs",
        type=cli.bounded_int(1, 200, "epochs"),
        nargs="+",
        default=None,
        help="epochs of every run; several: one run per horizon, and the gain between them (default: the full "
        "design's)",
    )
    args = p.parse_args(argv)

    import numpy as np

    from . import stats

    design = full_design(args.dataset)
    horizons = sorted(set(args.epochs or [design.matched.epochs]))
    seeds = range(1, args.seeds + 1)
    jobs = [(args.dataset, d, s, e) for e in horizons for s in seeds for d in DEPTHS]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        runs = {(d, s, e): a for d, s, e, a in pool.map(_run, jobs)}
    for short, long in zip(horizons, horizons[1:]):
        for d in DEPTHS:
            gain = np.array([runs[(d, s, long)] - runs[(d, s, short)] for s in seeds])
            print(
                f"depth {d}: {long} epochs minus {short}: {100 * gain.mean():+.3f} points "
                f"(per seed {', '.join(f'{100 * g:+.2f}' for g in gain)})"
            )
    acc = {(d, s): runs[(d, s, horizons[-1])] for d in DEPTHS for s in seeds}
    print(f"at {horizons[-1]} epochs:")
    m = design.matched
    family = 2 * (1 + len(m.budgets) + len(m.constant_budgets) + 1)  # recipe, matched settings, tuned: 2 each
    level = stats.ALPHA / family
    sds = []
    for other in (3, 5):
        diff = np.array([acc[(4, s)] - acc[(other, s)] for s in seeds])
        sds.append(float(diff.std(ddof=1)))
        print(f"depth 4 minus {other}: mean {100 * diff.mean():+.3f} points, sd {100 * sds[-1]:.3f} points")
    margin = DECLARED_MARGINS[args.dataset]
    needed = stats.seeds_to_resolve(max(sds), margin, level)
    print(
        f"seeds for 80% power at level {stats.ALPHA}/{family} = {level:.4f}, margin {100 * margin:g} points, "
        f"largest sd {100 * max(sds):.3f}: {needed}"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
