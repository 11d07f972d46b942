"""The depth study's vocabulary: what an experiment is (frozen configs), its search space, presets,
and how a study is named in the storage. Everything else in `study/` imports from here; this
module imports nothing from `study/` and nothing heavy (no PyTorch, no Optuna).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

MAX_DEPTH = 8


@dataclass(frozen=True)
class SearchSpace:
    """Nuisance hyperparameters, re-tuned for every depth. Widths taper: w[i] = w0 * taper**i."""

    lr: tuple[float, float] = (1e-3, 1.0)  # SGD step size, log scale
    width: tuple[int, int] = (32, 2048)  # first hidden width, log scale (1024 was too narrow: best sat on the edge)
    taper: tuple[float, float] = (0.25, 1.0)  # ratio of consecutive hidden widths
    max_epochs: int = 10  # epochs tuned in 1..max_epochs
    min_width: int = 8  # no hidden layer narrower than this


@dataclass(frozen=True)
class StudyConfig:
    """What defines the experiment. Stored in every study; resuming with other values is refused
    (except `n_trials` and `seeds`, which may grow, and `depths`, which selects studies)."""

    name: str = "full"  # see study_name()
    depths: tuple[int, ...] = (3, 4, 5)
    n_trials: int = 25  # per depth, in total over all workers and runs
    seeds: int = 5  # final retraining runs per depth
    space: SearchSpace = field(default_factory=SearchSpace)
    # Fixed hyperparameters (caveats on the conclusion):
    batch_size: int = 64  # the source text's
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    train_subset: int | None = None  # None: all 50k training images left after the hold-out
    val_size: int = 10_000
    split_seed: int = 0
    tuning_seed: int = 0  # init/batch-order seed of every tuning trial (common random numbers)
    sampler_seed: int = 0  # TPE seed, the same for every depth; each trial draws from (seed, trial number)
    sampler_startup_trials: int = 10  # TPE: random trials before it models the space
    pruner_startup_trials: int = 5  # MedianPruner: trials before any pruning
    pruner_warmup_epochs: int = 2  # MedianPruner: epochs before a trial can be pruned

    def identity(self) -> dict:
        """The settings that must match to resume a study."""
        d = dataclasses.asdict(self)
        for k in ("n_trials", "seeds", "depths"):
            d.pop(k)
        d["space"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["space"].items()}
        return d


@dataclass(frozen=True)
class RunConfig:
    """How this process runs the study: not part of the experiment's identity."""

    storage: str
    out: Path
    data_dir: Path | None = None
    device: str = "cpu"
    threads: int = 1  # per worker
    workers: int = 1
    heartbeat_interval: int = 10  # seconds; a killed worker's trial is failed after the grace period
    grace_period: int = 30
    render_report: bool = True


PRESETS = {
    # Small budget on a 10k training subset: the tests' and the README's first command.
    "quick": StudyConfig(name="quick", n_trials=12, seeds=3, train_subset=10_000, val_size=5_000,
                         space=SearchSpace(width=(16, 256), max_epochs=4), sampler_startup_trials=5,
                         pruner_startup_trials=3, pruner_warmup_epochs=1),
    # The committed study, sized for about 35 minutes on 2 CPU cores with --workers 2.
    "full": StudyConfig(),
}


def hidden_widths(depth: int, width: int, taper: float, space: SearchSpace) -> tuple[int, ...]:
    return tuple(max(space.min_width, round(width * taper**i)) for i in range(depth - 1))


def widths_of(depth: int, params: dict, space: SearchSpace) -> tuple[int, ...]:
    """Hidden widths of a trial's parameters (depth 1, softmax regression, has none)."""
    if depth <= 1:
        return ()
    return hidden_widths(depth, int(params["width"]), float(params.get("taper", 1.0)), space)


def space_from_dict(d: dict) -> SearchSpace:
    """Inverse of StudyConfig.identity()["space"] (JSON lists back to tuples)."""
    return SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --- names in the storage ------------------------------------------------------------------------

FINAL_SUFFIX = "-final"


def study_name(name: str, depth: int, final: bool = False) -> str:
    """f"{name}-depth{d}" tunes depth d; f"{name}-depth{d}-final" holds its retraining runs."""
    return f"{name}-depth{depth}" + (FINAL_SUFFIX if final else "")


def parse_study_name(study: str) -> tuple[str, int] | None:
    """(name, depth) of a tuning study's name, None for any other study."""
    prefix, sep, rest = study.rpartition("-depth")
    return (prefix, int(rest)) if sep and rest.isdigit() else None
