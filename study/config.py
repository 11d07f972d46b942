"""The depth study's vocabulary: its three experiments (frozen configs), the cells they are made of,
presets, and how a study is named in the storage. Everything else in `study/` imports from here; this
module imports nothing from `study/` and nothing heavy (no PyTorch, no Optuna).

Three experiments answer three versions of "why four layers?" (docs/method.md):
- recipe:  the source text's own recipe and funnel across depths, no tuning, many seeds;
- matched: depth at a matched parameter budget, learning rate tuned per (budget, depth) cell;
- tuned:   each depth at its best, learning rate, widths and epochs tuned per depth.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mnist_bench.errors import UsageError

MAX_DEPTH = 8
EXPERIMENTS = ("recipe", "matched", "tuned")
SOURCE_PARAMS = 242_762  # 784-256-128-64-10
CLASSES = 10
FAILED_AT = 2 / CLASSES  # a run ending at or below twice chance accuracy learned nothing
# A tuning trial in the tables: complete; failed (ran to the end at or below twice chance); diverged
# (NaN/inf loss); pruned; interrupted (killed or stopped, then redone); running or waiting (in flight).
TRIAL_STATES = ("complete", "failed", "diverged", "pruned", "interrupted", "running", "waiting")
DEFAULT_MARGIN = 0.002  # the report's equivalence margin: 0.2 points, the smallest difference that matters


def failed_run(accuracy: float, loss: float = 0.0, diverged: bool = False) -> bool:
    """A failed run: it diverged, its loss or accuracy is not finite, or it ends at or below twice
    chance (the 60k-parameter depth-6 funnel once stayed at 11.35% with loss ln 10 from epoch 1)."""
    acc, loss = float(accuracy), float(loss)
    return bool(diverged) or not math.isfinite(acc) or acc <= FAILED_AT or not math.isfinite(loss)


@dataclass(frozen=True)
class SearchSpace:
    """The tuned experiment's nuisance hyperparameters. Widths taper: w[i] = w0 * taper**i."""

    lr: tuple[float, float] = (1e-3, 1.0)  # SGD step size, log scale
    width: tuple[int, int] = (32, 1024)  # first hidden width, log scale; the upper limit is a cost cap
    taper: tuple[float, float] = (0.25, 1.0)  # ratio of consecutive widths; 1.0 caps the funnel shape
    max_epochs: int = 10  # epochs tuned in 1..max_epochs; a cost cap (the source's longest run)
    min_width: int = 8  # no hidden layer narrower than this

    # Upper limits that are caps of the design, declared in the report, not edges to widen.
    CAPS = {
        "width": "cost cap: first hidden layer at most 1,024 units",
        "taper": "shape cap: no layer wider than the one before (the source's funnel)",
        "epochs": "cost cap: at most 10 epochs, the source text's longest run",
    }


@dataclass(frozen=True)
class Recipe:
    """The source text's recipe exactly: plain SGD, lr 0.03, batch 64, all 60k training images,
    inputs in [0, 1], its funnel cut or extended to each depth. Test accuracy after every epoch."""

    depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    funnel: tuple[int, ...] = (256, 128, 64, 32, 16)  # hidden widths; depth d keeps the first d-1
    lr: float = 0.03
    momentum: float = 0.0
    epochs: int = 10
    seeds: int = 10
    # (depth, epochs, claimed test accuracy) as the source text states them
    claims: tuple[tuple[int, int, float], ...] = ((1, 2, 0.9211), (4, 2, 0.96), (4, 10, 0.98))


@dataclass(frozen=True)
class Matched:
    """Depth at a matched parameter budget: hidden widths halve layer to layer (floored at
    `min_width`), scaled so each model is within 2% of its budget; softmax (depth 1) is the reference."""

    depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # depth 1 has one size (7,850 parameters): one cell
    budgets: tuple[int, ...] = (60_000, SOURCE_PARAMS, 1_000_000)
    lr: tuple[float, float] = (1e-3, 1.0)  # tuned per cell on a log grid over this range
    lr_points: int = 7  # grid points (half a decade apart), the same in every cell: the per-cell trial budget
    epochs: int = 10  # fixed, as in the recipe
    seeds: int = 8
    min_width: int = 8
    tolerance: float = 0.02  # parameter count within 2% of the budget


@dataclass(frozen=True)
class Tuned:
    """Each depth at its best: one search per depth over learning rate, widths and epochs."""

    depths: tuple[int, ...] = (3, 4, 5)
    n_trials: int = 16  # per depth
    seeds: int = 8
    space: SearchSpace = field(default_factory=SearchSpace)


@dataclass(frozen=True)
class StudyConfig:
    """What defines the study. Stored in every study; resuming with other values is refused (except
    budgets of trials and seeds, which may grow, and the selection of experiments, depths, budgets)."""

    name: str = "full"  # see study_name()
    dataset: str = "mnist"  # or "fashion-mnist": same shapes, a harder task
    experiments: tuple[str, ...] = EXPERIMENTS
    recipe: Recipe = field(default_factory=Recipe)
    matched: Matched = field(default_factory=Matched)
    tuned: Tuned = field(default_factory=Tuned)
    # Fixed hyperparameters of the matched and tuned experiments (caveats on the conclusion):
    batch_size: int = 64  # the source text's
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    train_subset: int | None = None  # None: every training image (recipe: 60k; others: 50k after the hold-out)
    val_size: int = 10_000
    split_seed: int = 0
    tuning_seed: int = 0  # init/batch-order seed of every tuning trial (common random numbers)
    sampler_seed: int = 0  # TPE seed, the same for every cell; each trial draws from (seed, trial number)
    sampler_startup_trials: int = 10  # TPE: random trials before it models the space
    pruner_startup_trials: int = 5  # MedianPruner: trials before any pruning
    pruner_warmup_epochs: int = 2  # MedianPruner: epochs before a trial can be pruned

    def cells(self) -> list[Cell]:
        out: list[Cell] = []
        if "recipe" in self.experiments:
            out += [Cell("recipe", d) for d in self.recipe.depths]
        if "matched" in self.experiments:
            out += [Cell("matched", 1)] if 1 in self.matched.depths else []
            out += [Cell("matched", d, b) for b in self.matched.budgets for d in self.matched.depths if d > 1]
        if "tuned" in self.experiments:
            out += [Cell("tuned", d) for d in self.tuned.depths]
        return out

    def n_trials(self, cell: Cell) -> int:
        return {"recipe": 0, "matched": self.matched.lr_points, "tuned": self.tuned.n_trials}[cell.experiment]

    def seeds(self, cell: Cell) -> int:
        return getattr(self, cell.experiment).seeds

    def identity(self, cell: Cell) -> dict:
        """The settings that must match to resume the studies of `cell`."""
        d = dataclasses.asdict(self)
        for k in ("name", "experiments", *EXPERIMENTS):
            d.pop(k)
        exp = dataclasses.asdict(getattr(self, cell.experiment))
        for k in ("depths", "budgets", "n_trials", "seeds"):  # lr_points stays: it defines the grid
            exp.pop(k, None)
        return jsonable({**d, "experiment": exp, "cell": cell.key})


def jsonable(x):
    """Tuples to lists, recursively: what a JSON round trip through the storage gives back."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


@dataclass(frozen=True, order=True)
class Cell:
    """One independent unit of a study: a depth within an experiment (and a budget, for matched)."""

    experiment: str
    depth: int
    budget: int | None = None  # matched: parameter budget (None for the softmax reference)

    @property
    def key(self) -> str:
        budget = f"-params{self.budget}" if self.budget is not None else ""
        return f"{self.experiment}{budget}-depth{self.depth}"


@dataclass(frozen=True)
class RunConfig:
    """How this process runs the study: not part of the study's identity."""

    storage: str
    out: Path
    data_dir: Path | None = None
    device: str = "cpu"
    threads: int = 1  # per worker
    workers: int = 1
    heartbeat_interval: int = 10  # seconds; a killed worker's run is failed after the grace period
    grace_period: int = 30
    render_report: bool = True


PRESETS = {
    # Small budgets on a 5k training subset: the tests' and the README's first command.
    "quick": StudyConfig(
        name="quick",
        train_subset=5_000,
        val_size=5_000,
        recipe=Recipe(seeds=3),
        matched=Matched(budgets=(60_000, SOURCE_PARAMS), epochs=3, lr_points=4, seeds=3),
        tuned=Tuned(n_trials=8, seeds=3, space=SearchSpace(width=(16, 256), max_epochs=4)),
        sampler_startup_trials=5,
        pruner_startup_trials=3,
        pruner_warmup_epochs=1,
    ),
    # The committed study, sized for under an hour on 2 CPU cores with --workers 2.
    "full": StudyConfig(),
}


def lr_grid(m: Matched) -> tuple[float, ...]:
    """The matched experiment's learning rates: `lr_points` values evenly spaced on a log scale."""
    lo, hi = m.lr
    n = m.lr_points
    return tuple(lo * (hi / lo) ** (i / (n - 1)) for i in range(n)) if n > 1 else (lo,)


def hidden_widths(depth: int, width: int, taper: float, space: SearchSpace) -> tuple[int, ...]:
    return tuple(max(space.min_width, round(width * taper**i)) for i in range(depth - 1))


def widths_of(depth: int, params: dict, space: SearchSpace) -> tuple[int, ...]:
    """Hidden widths of a tuned trial's parameters (depth 1, softmax regression, has none)."""
    if depth <= 1:
        return ()
    return hidden_widths(depth, int(params["width"]), float(params.get("taper", 1.0)), space)


def space_from_dict(d: dict) -> SearchSpace:
    """Inverse of dataclasses.asdict(SearchSpace) after a JSON round trip (lists back to tuples)."""
    return SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def cell_widths(cell: Cell, params: dict, settings: dict) -> tuple[int, ...]:
    """Hidden widths of a cell's model: the recipe's funnel cut to depth, the matched budget's
    halving funnel, or a tuned trial's widths. `settings` is the experiment's config as a dict
    (dataclasses.asdict of it, or the copy stored in the study), so the workers and the tables
    apply the same rule."""
    if cell.experiment == "recipe":
        return tuple(settings["funnel"][: cell.depth - 1])
    if cell.experiment == "matched":
        from mnist_bench.models import funnel_for_budget  # noqa: PLC0415 - keeps this module free of PyTorch

        return funnel_for_budget(cell.depth, cell.budget or 0, settings["min_width"])
    return widths_of(cell.depth, params, space_from_dict(settings["space"]))


# --- names in the storage ------------------------------------------------------------------------

FINAL_SUFFIX = "-final"
NAME = re.compile(r"(?P<name>.+)-(?P<experiment>recipe|matched|tuned)(-params(?P<budget>\d+))?-depth(?P<depth>\d+)")


def study_name(name: str, cell: Cell, final: bool = False) -> str:
    """f"{name}-{cell.key}" tunes the cell; f"{name}-{cell.key}-final" holds its retraining runs."""
    return f"{name}-{cell.key}" + (FINAL_SUFFIX if final else "")


def parse_study_name(study: str) -> tuple[str, Cell] | None:
    """(name, cell) of a tuning study's name, None for any other study."""
    m = NAME.fullmatch(study)
    if not m:
        return None
    budget = int(m["budget"]) if m["budget"] else None
    return m["name"], Cell(m["experiment"], int(m["depth"]), budget)


def refuse_other_study(out: Path, name: str, database: Path | None = None) -> None:
    """A results folder belongs to one study: refuse (one line) to write study `name`'s tables or
    report into `out` when its config.json, or the SQLite `database` the command would add to, holds
    another study. So a quick run never rewrites the committed results/ of the full study."""
    config = out / "config.json"
    if config.is_file():
        import json

        try:
            found = json.loads(config.read_text())
            found = found.get("name") if isinstance(found, dict) else None
        except (ValueError, UnicodeDecodeError):
            found = None
        if found != name:
            what = f"study {found!r}" if found else "a config.json this command did not write"
            raise UsageError(
                f"{out} holds the tables of {what}, not {name!r}: pick another --out (a results folder is "
                "rewritten only by the study that made it)"
            )
    if database is not None and database.is_file():
        others = sorted({n for n in stored_study_names(database) if n != name})
        if others:
            raise UsageError(
                f"{database} holds study {others[0]!r}, not {name!r}: pick another --out, or pass --storage to share "
                "a storage on purpose"
            )


def stored_study_names(database: Path) -> set[str]:
    """Study name prefixes of the depth studies in an SQLite file, read without writing to it."""
    import contextlib
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as con:
            rows = con.execute("select study_name from studies").fetchall()
    except sqlite3.Error:
        return set()  # empty, damaged or not Optuna's: the storage layer says so in its own words
    return {parsed[0] for (study,) in rows if (parsed := parse_study_name(study))}
