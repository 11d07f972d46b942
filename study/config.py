"""The depth study's vocabulary: its three experiments (frozen configs), the cells they are made of,
presets, and how a study is named in the storage. Everything else in `study/` imports from here; this
module imports nothing from `study/` and nothing heavy (no PyTorch, no Optuna).

Three experiments answer three versions of "why four layers?" (docs/method.md):
- recipe:  the source text's own recipe and funnel across depths, no tuning, many seeds;
- matched: depth at a matched parameter budget, every depth at every rate of one band (the factorial);
- tuned:   each depth at its best, learning rate, widths and epochs tuned per depth.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mnist_bench.errors import UsageError
from mnist_bench.sizes import widths_for_budget

MAX_DEPTH = 8
EXPERIMENTS = ("recipe", "matched", "tuned")
SHAPES = ("funnel", "constant")  # hidden widths halving layer to layer (the text's), or all equal
SOURCE_PARAMS = 242_762  # 784-256-128-64-10
CLASSES = 10
FAILED_AT = 2 / CLASSES  # a run ending at or below twice chance accuracy learned nothing
# A tuning trial in the tables: complete; failed (ran to the end at or below twice chance); diverged
# (NaN/inf loss); pruned; interrupted (killed or stopped, then redone); running or waiting (in flight).
TRIAL_STATES = ("complete", "failed", "diverged", "pruned", "interrupted", "running", "waiting")
DEFAULT_MARGIN = 0.002  # the equivalence margin of studies that declare none (no matched experiment)
# The declared margins (docs/method.md, "The margin"): a tenth of the error rate of the text's network at its own
# budget (depth 4, 242,762 parameters) in the previous committed study, rounded to a hundredth of a point: a change
# of depth that removes or adds fewer than one error in ten does not matter. Declared before the rerun's test
# results were read: MNIST 98.26% (an error rate of 1.74%), Fashion-MNIST 88.78% (11.22%).
DECLARED_MARGINS = {"mnist": 0.0017, "fashion-mnist": 0.0112}


def declared_margin(config: Mapping) -> float:
    """The equivalence margin a study declares (`config`: its config.json): the dataset's DECLARED_MARGINS for a
    study with a matched experiment (the factorial design, which declared them), DEFAULT_MARGIN for one without."""
    band = config.get("experiments", {}).get("matched", {}).get("band")
    return DECLARED_MARGINS.get(config.get("dataset", "mnist"), DEFAULT_MARGIN) if band else DEFAULT_MARGIN


def failed_run(accuracy: float, loss: float = 0.0, diverged: bool = False) -> bool:
    """A failed run: it diverged, its loss or accuracy is not finite, or it ends at or below twice
    chance (the 60k-parameter depth-6 funnel once stayed at 11.35% with loss ln 10 from epoch 1)."""
    acc, loss = float(accuracy), float(loss)
    return bool(diverged) or not math.isfinite(acc) or acc <= FAILED_AT or not math.isfinite(loss)


@dataclass(frozen=True)
class SearchSpace:
    """The tuned experiment's nuisance hyperparameters. Widths taper: w[i] = w0 * taper**i."""

    lr: tuple[float, float] = (1e-3, 1.0)  # SGD peak step size (it then decays to zero), log scale
    width: tuple[int, int] = (32, 1024)  # first hidden width, log scale; the upper limit is a cost cap
    taper: tuple[float, float] = (0.25, 1.0)  # ratio of consecutive widths; 1.0 caps the funnel shape
    max_epochs: int = 15  # epochs tuned in 1..max_epochs; a cost cap
    min_width: int = 16  # no hidden layer narrower than this (wider than the 10 classes)

    # Upper limits that are caps of the design, declared in the report, not edges to widen.
    CAPS = {
        "width": "cost cap: first hidden layer at most 1,024 units",
        "taper": "shape cap: no layer wider than the one before (the source's funnel)",
        "epochs": "cost cap: at most 15 epochs (with the learning rate decaying to zero over the run)",
    }


# The recipe plus one change at a time: what could have produced the text's claims (docs/method.md).
VARIANTS = {
    "momentum": "momentum 0.9",
    "fastlr": "learning rate 0.1",
    "standardised": "inputs standardised",
    "twice": "twice the epochs",
}


@dataclass(frozen=True)
class Recipe:
    """The source text's recipe exactly: plain SGD, lr 0.03 constant, batch 64, all 60k training images,
    inputs in [0, 1], its funnel cut or extended to each depth. Test accuracy after every epoch.
    `variants` retrain the claimed depths with one change each (VARIANTS) to explain the claims."""

    depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    funnel: tuple[int, ...] = (256, 128, 64, 32, 16)  # hidden widths; depth d keeps the first d-1
    lr: float = 0.03
    momentum: float = 0.0
    epochs: int = 10
    seeds: int = 10
    # (depth, epochs, claimed test accuracy) as the source text states them
    claims: tuple[tuple[int, int, float], ...] = ((1, 2, 0.9211), (4, 2, 0.96), (4, 10, 0.98))
    variants: tuple[str, ...] = tuple(VARIANTS)
    variant_seeds: int = 5
    variant_momentum: float = 0.9
    variant_lr: float = 0.1

    def variant(self, name: str) -> dict:
        """lr, momentum, epochs and input scaling of the recipe with one change (`name`; "" is the recipe)."""
        out = {"lr": self.lr, "momentum": self.momentum, "epochs": self.epochs, "standardised": False}
        change = {
            "": {},
            "momentum": {"momentum": self.variant_momentum},
            "fastlr": {"lr": self.variant_lr},
            "standardised": {"standardised": True},
            "twice": {"epochs": 2 * self.epochs},
        }[name]
        return out | change

    @property
    def claim_depths(self) -> tuple[int, ...]:
        return tuple(sorted({d for d, _, _ in self.claims}))


def rank_band(scores: Mapping[int, list[float]]) -> list[int]:
    """A factorial cell's band points in order of preference from each point's validation accuracies over the
    seeds: the highest mean first, ties to the earlier point of the band as declared (its
    rates ascend, then any appended ones). The one rule: the workers (the horizon check retrains the first),
    the tables and the analysis (stats.chosen makes the same choice again inside every resample) apply it."""
    means = {i: sum(v) / len(v) for i, v in scores.items() if len(v)}
    return sorted(means, key=lambda i: (-means[i], i))


CHECKS = {
    "horizon": "twice the epochs at the chosen learning rate",
}
# The last commit that runs and reports the grid design (a matched experiment without a band: each cell's rate chosen
# on a grid of tuning runs, then retrained): what reads a study stored by it.
GRID_DESIGN_COMMIT = "88d9cef"


def refuse_grid_design(experiment: str, settings, what: str) -> None:
    """One line for a matched experiment stored without a band (`settings`: its stored settings; `what`: where it was
    found, e.g. "study 'full' in this storage"): the grid design, which this version neither resumes nor reports."""
    if experiment == "matched" and isinstance(settings, Mapping) and not settings.get("band"):
        raise UsageError(
            f"{what} was stored by the grid design (a matched experiment without a band of learning rates), which "
            f"this version no longer runs or reports: use commit {GRID_DESIGN_COMMIT} to read it"
        )


# The factorial design as declared for each dataset before its rerun (docs/method.md: "The design, declared"):
# - band: the quarter-decade grid points around every optimum of depths 3-5 in both earlier runs' grids (MNIST's
#   optima fell on 0.0316-0.1, Fashion-MNIST's on 0.0316-0.0562), with a point to spare where an optimum sat
#   near an end; the same band for every depth. A band grows by appending rates (a depth's choice on its edge:
#   the band was wrong there), which keeps every trained run's band point;
# - seeds: 80% power at the Holm level for the declared margin at the spread the earlier runs measured, with room
#   for the test-set and choice variance the intervals now carry (MNIST: 14 at a per-seed spread of 0.14 points;
#   Fashion-MNIST: 4 at 0.23, kept at 10 so the seed resamples have something to resample);
# - epochs: Fashion-MNIST's late gain from 10 to 20 epochs is +0.69 to +0.91 points, from 20 to 40 epochs -0.15
#   to +0.34 (python -m study.pilot --dataset fashion-mnist --epochs 10 20 40 --seeds 2:
#   results/pilots/fashion-mnist-horizon.log), so 20; MNIST's from 10 to 20 is +0.03 to +0.09 (the earlier run's
#   horizon check), so 10, the horizon check measuring it again.
# Cut to fit 90 minutes: the 1,000,000-parameter budget, the secondary depths 2 and 6 of the matched experiment
# and its runner-up check (the factorial trains every rate), and the constant-width shape (on MNIST cut during its
# run, before any constant-width run had started, when the 242,762-parameter funnel turned out to take 5 runs a
# minute); on Fashion-MNIST, whose runs are twice as long, also the 60,000-parameter budget: its matched setting
# is the text's 242,762-parameter funnel, where the seeds are sized.
QUARTER_DECADES = {k: 10 ** (k / 4) for k in range(-8, 0)}  # 0.01, 0.0178, ..., 0.562
FULL_DESIGN = {
    "mnist": {
        # 0.0178 appended when the 60,000-parameter depth 4 chose 0.0316, the lower edge (validation only)
        "band": tuple(QUARTER_DECADES[k] for k in (-6, -5, -4, -3, -7)),
        "seeds": 16,
        "epochs": 10,
        "budgets": (60_000, SOURCE_PARAMS),
        "constant_budgets": (),  # cut during the run, before any of its runs started: 90 minutes (docs/method.md)
    },
    "fashion-mnist": {
        # 0.01 appended when the 242,762-parameter depth 5 chose 0.0178, the lower edge (validation only)
        "band": tuple(QUARTER_DECADES[k] for k in (-7, -6, -5, -4, -8)),
        "seeds": 10,
        "epochs": 20,
        "budgets": (SOURCE_PARAMS,),
        "constant_budgets": (),
    },
}


@dataclass(frozen=True)
class Matched:
    """Depth at a matched parameter budget: hidden widths halve layer to layer (the funnel) or stay
    equal (constant, at `constant_budgets`), floored at `min_width`, each model within 2% of its budget;
    softmax (depth 1) is the reference.

    The factorial design (docs/method.md): every cell trains every rate of the `band` with each final seed,
    reading validation (for choosing a depth's rate: rank_band) and test (for the answer); nothing is tuned apart,
    so the choice is made again inside every resample of the analysis. Depths outside 3-5 are references with
    `reference_seeds`. The defaults are MNIST's declared design (FULL_DESIGN)."""

    depths: tuple[int, ...] = (1, 3, 4, 5)  # depth 1 has one size (7,850 parameters): one cell
    budgets: tuple[int, ...] = FULL_DESIGN["mnist"]["budgets"]
    constant_budgets: tuple[int, ...] = ()  # the second shape (depth 2: the same network); a selection, like budgets
    band: tuple[float, ...] = FULL_DESIGN["mnist"]["band"]  # peak learning rates; a band grows by appending rates
    epochs: int = FULL_DESIGN["mnist"]["epochs"]  # the learning rate decays to zero over them
    seeds: int = FULL_DESIGN["mnist"]["seeds"]  # depths 3-5: from the paired spread measured earlier (docs/method.md)
    reference_seeds: int = 6  # the depths outside 3-5 (secondary references)
    min_width: int = 16
    tolerance: float = 0.02  # parameter count within 2% of the budget
    # The check at the text's budget: depths 3-5 retrained at twice the epochs at the rate each chose.
    checks: tuple[str, ...] = tuple(CHECKS)
    check_budget: int = SOURCE_PARAMS
    check_seeds: int = 6

    def __post_init__(self) -> None:
        if not self.band:
            raise UsageError("the matched experiment needs a band of learning rates (every cell trains each of them)")
        if unknown := [c for c in self.checks if c not in CHECKS]:
            raise UsageError(f"checks must be among {', '.join(CHECKS)}, got {unknown[0]!r}")


@dataclass(frozen=True)
class Tuned:
    """Each depth at its best: one search per depth over learning rate, widths and epochs, sampled
    independently per depth, never pruned; `n_trials` completed trials (failed ones are replaced)."""

    depths: tuple[int, ...] = (3, 4, 5)
    n_trials: int = 24  # completed, trained (not failed) trials per depth
    seeds: int = 6  # fewer than matched: what the 90 minutes hold (docs/method.md)
    space: SearchSpace = field(default_factory=SearchSpace)
    # The search's own variance: its runners-up (the next-best trials by validation) retrained too, with fewer
    # seeds each; the tuned contrasts' range over every pick of the top 1 + runners_up (docs/method.md).
    runners_up: int = 0
    runner_up_seeds: int = 3


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
    schedule: str = "linear"  # the learning rate decays linearly to zero over each run
    train_subset: int | None = None  # None: every training image (recipe: 60k; others: 50k after the hold-out)
    val_size: int = 10_000
    split_seed: int = 0
    tuning_seed: int = 0  # init/batch-order seed of the tuned searches' trials, <= 0 (never a final run's)
    sampler_seed: int = 0  # TPE seed; each cell's search draws from (seed, cell, trial number): independent
    sampler_startup_trials: int = 10  # TPE: random trials before it models the space
    # Seed k also draws the validation hold-out of its final runs (split_seed + k), so the training subset varies
    # with the seed, identically across depths and rates; tuning runs keep the split of split_seed.
    split_per_seed: bool = False

    def final_split(self, seed: int) -> int:
        """The split seed of final run `seed`'s hold-out."""
        return self.split_seed + seed if self.split_per_seed else self.split_seed

    def __post_init__(self) -> None:
        if self.tuning_seed > 0:  # final runs use seeds 1..K: a tuning run must never be one of them
            raise UsageError(f"tuning_seed must be 0 or below (final runs use seeds 1, 2, ...), got {self.tuning_seed}")

    def cells(self) -> list[Cell]:
        out: list[Cell] = []
        r, m = self.recipe, self.matched
        if "recipe" in self.experiments:
            out += [Cell("recipe", d) for d in r.depths]
            if self.dataset == "mnist":  # the text's claims are about MNIST
                out += [Cell("recipe", d, variant=v) for v in r.variants for d in r.claim_depths if d in r.depths]
        if "matched" in self.experiments:
            out += [Cell("matched", 1)] if 1 in m.depths else []
            for b in m.budgets:
                depths = [d for d in m.depths if d > 1]
                out += [Cell("matched", d, b) for d in depths]
                if b in m.constant_budgets:
                    out += [Cell("matched", d, b, shape="constant") for d in depths if d > 2]
            if m.check_budget in m.budgets:
                out += [
                    Cell("matched", d, m.check_budget, variant=v)
                    for v in m.checks
                    for d in m.depths
                    if d in NEIGHBOURHOOD
                ]
        if "tuned" in self.experiments:
            out += [Cell("tuned", d) for d in self.tuned.depths]
        return out

    def n_trials(self, cell: Cell) -> int:
        """Tuning trials of a cell: the tuned search's completed trials; none for the recipe and its variants,
        and none for a matched cell (every rate of its band is a final run) or its check."""
        return self.tuned.n_trials if cell.experiment == "tuned" else 0

    def final_runs(self, cell: Cell) -> int:
        return final_runs(cell, self.seeds(cell), dataclasses.asdict(getattr(self, cell.experiment)))

    def seeds(self, cell: Cell) -> int:
        if cell.experiment == "recipe" and cell.variant:
            return self.recipe.variant_seeds
        if cell.experiment == "matched" and cell.variant:
            return self.matched.check_seeds
        if cell.experiment == "matched" and cell.depth not in NEIGHBOURHOOD:
            return self.matched.reference_seeds
        return getattr(self, cell.experiment).seeds

    def identity(self, cell: Cell) -> dict:
        """The settings that must match to resume the studies of `cell`."""
        d = dataclasses.asdict(self)
        for k in ("name", "experiments", *EXPERIMENTS):
            d.pop(k)
        if not self.split_per_seed:
            d.pop("split_per_seed")  # as studies stored before it
        exp = dataclasses.asdict(getattr(self, cell.experiment))
        for k in (
            "depths",
            "budgets",
            "n_trials",
            "seeds",
            "variant_seeds",
            "check_seeds",
            "reference_seeds",
            "runner_up_seeds",
            *SELECTION,
        ):
            exp.pop(k, None)  # budgets of runs may grow
        if cell.experiment == "tuned" and not self.tuned.runners_up:
            exp.pop("runners_up")
        return jsonable({**d, "experiment": exp, "cell": cell.key})


NEIGHBOURHOOD = (3, 4, 5)  # the depths of "why four layers, not three or five?"
# Which settings a command selects, like its depths and budgets: not part of a cell's identity.
SELECTION = ("constant_budgets",)


# Settings of the grid design that factorial studies stored before it was removed, with the values they held there
# (None: any); they choose nothing in a factorial (it tunes no rate), so such a study resumes without them.
RETIRED = {"lr": None, "lr_points": None, "replicates": None, "lr_rule": None, "thin_budgets": []}


def comparable(stored: dict) -> dict:
    """A stored identity as StudyConfig.identity makes it now: without the selection keys older studies stored, and,
    for a factorial (a matched band), without the grid design's settings it stored as they were (RETIRED)."""
    exp = stored.get("experiment")
    if not isinstance(exp, dict):
        return stored
    retired = {k for k, v in RETIRED.items() if k in exp and (v is None or exp[k] == v)} if exp.get("band") else set()
    if not retired and not any(k in exp for k in SELECTION):
        return stored
    return {**stored, "experiment": {k: v for k, v in exp.items() if k not in SELECTION and k not in retired}}


def final_runs(cell: Cell, seeds: int, settings: Mapping) -> int:
    """Final runs of a cell with `seeds` seeds (`settings`: its experiment's, as a dict or as stored): times the
    band's rates in a factorial cell (not its check), plus each runner-up's seeds in a tuned cell."""
    if cell.experiment == "matched" and settings.get("band") and not cell.variant:
        return seeds * len(settings["band"])
    if cell.experiment == "tuned":
        return seeds + int(settings.get("runners_up", 0)) * int(settings.get("runner_up_seeds", 0))
    return seeds


def jsonable(x):
    """Tuples to lists, recursively: what a JSON round trip through the storage gives back."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


@dataclass(frozen=True, order=True)
class Cell:
    """One independent unit of a study: a depth within an experiment (and a budget, for matched), of
    a shape, as declared or with one change (`variant`: a recipe variant or a matched check)."""

    experiment: str
    depth: int
    budget: int | None = None  # matched: parameter budget (None for the softmax reference)
    shape: str = "funnel"  # matched: "funnel" (halving) or "constant" (equal widths)
    variant: str = ""  # recipe: a key of VARIANTS; matched: a key of CHECKS; "" the cell as declared

    @property
    def key(self) -> str:
        shape = f"-{self.shape}" if self.shape != "funnel" else ""
        variant = f"-{self.variant}" if self.variant else ""
        budget = f"-params{self.budget}" if self.budget is not None else ""
        return f"{self.experiment}{shape}{variant}{budget}-depth{self.depth}"


def chooser(cell: Cell) -> Cell:
    """The cell whose runs choose `cell`'s learning rate: a matched check's own cell as declared (the check retrains
    the band point it chose); otherwise the cell itself."""
    return dataclasses.replace(cell, variant="") if cell.experiment == "matched" else cell


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
    pack: int = 12  # most networks a worker trains in one pass (results do not depend on it: docs/method.md)


PRESETS = {
    # The first command (`make study`): the text's recipe at depths 1 and 3-5 (10 seeds) and the recipe with momentum
    # 0.9 at the claimed depths 1 and 4 (5 seeds), 2 epochs on every training image: the full study's cells and
    # seeds, read at 2 epochs; about 1.5 minutes on 2 cores.
    "quick": StudyConfig(
        name="quick",
        experiments=("recipe",),
        split_per_seed=True,  # as the full study (the recipe holds nothing out): the same identity
        recipe=Recipe(depths=(1, 3, 4, 5), epochs=2, seeds=10, variants=("momentum",), variant_seeds=5),
    ),
    # Every experiment and check, small, on a 2k training subset: what the tests run end to end. The matched experiment
    # is the full design's factorial with a band of three rates half a decade apart, both shapes at the text's budget
    # and fewer seeds.
    "smoke": StudyConfig(
        name="smoke",
        train_subset=2_000,
        val_size=2_000,
        recipe=Recipe(epochs=3, seeds=3, variant_seeds=2),
        matched=Matched(
            constant_budgets=(SOURCE_PARAMS,),
            band=(QUARTER_DECADES[-6], QUARTER_DECADES[-4], QUARTER_DECADES[-2]),
            epochs=3,
            seeds=3,
            reference_seeds=2,
            check_seeds=2,
        ),
        tuned=Tuned(n_trials=5, seeds=3, space=SearchSpace(width=(16, 128), max_epochs=3)),
        sampler_startup_trials=3,
    ),
    # "full", the committed study, sized for at most 90 minutes per dataset on 2 CPU cores (--workers 2), is the
    # design each dataset declares: full_design(dataset), below.
}


def full_design(dataset: str) -> StudyConfig:
    """The full preset as `dataset` declares it: the factorial matched experiment, per-seed hold-outs and the margin."""
    d = FULL_DESIGN[dataset]
    matched = Matched(
        depths=(1, *NEIGHBOURHOOD),
        budgets=d["budgets"],
        constant_budgets=d["constant_budgets"],
        band=d["band"],
        seeds=d["seeds"],
        epochs=d["epochs"],
    )
    return dataclasses.replace(
        StudyConfig(),
        dataset=dataset,
        matched=matched,
        tuned=Tuned(runners_up=2),
        split_per_seed=True,
    )


PRESETS["full"] = full_design("mnist")


def preset(name: str, dataset: str = "mnist") -> StudyConfig:
    """A preset for `dataset`: the full one as that dataset declares it (full_design), the others as they are."""
    return full_design(dataset) if name == "full" else dataclasses.replace(PRESETS[name], dataset=dataset)


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
        return widths_for_budget(cell.depth, cell.budget or 0, settings["min_width"], cell.shape)
    return widths_of(cell.depth, params, space_from_dict(settings["space"]))


# --- names in the storage ------------------------------------------------------------------------

FINAL_SUFFIX = "-final"
PREDICTIONS_FILE = "predictions.npz"  # every final run's predicted class of each test image, beside the tables
NAME = re.compile(
    r"(?P<name>.+)-(?P<experiment>recipe|matched|tuned)(-(?P<shape>constant))?"
    rf"(-(?P<variant>{'|'.join([*VARIANTS, *CHECKS])}))?(-params(?P<budget>\d+))?-depth(?P<depth>\d+)"
)


def in_memory(url: str) -> bool:
    """sqlite://, sqlite:///, sqlite:///:memory: and mode=memory URLs keep nothing when the command ends."""
    rest = url.removeprefix("sqlite:").lstrip("/") if url.startswith("sqlite:") else None
    return rest is not None and (rest in ("", ":memory:") or rest.startswith(":memory:") or "mode=memory" in rest)


def study_name(name: str, cell: Cell, final: bool = False) -> str:
    """f"{name}-{cell.key}" tunes the cell; f"{name}-{cell.key}-final" holds its retraining runs."""
    return f"{name}-{cell.key}" + (FINAL_SUFFIX if final else "")


# Optuna's column holds a study name of at most 512 characters (VARCHAR(512): PostgreSQL and MySQL refuse a
# longer one, SQLite does not); the same name must work on every storage, so --study-name leaves room for the
# longest suffix a cell adds.
STORED_NAME_CHARS = 512
MAX_STUDY_NAME = STORED_NAME_CHARS - len(
    study_name("", Cell("matched", MAX_DEPTH, 10**10 - 1, "constant", max([*VARIANTS, *CHECKS], key=len)), final=True)
)


def parse_study_name(study: str) -> tuple[str, Cell] | None:
    """(name, cell) of a tuning study's name, None for any other study."""
    m = NAME.fullmatch(study)
    if not m:
        return None
    budget = int(m["budget"]) if m["budget"] else None
    return m["name"], Cell(m["experiment"], int(m["depth"]), budget, m["shape"] or "funnel", m["variant"] or "")


def refuse_other_study(out: Path, name: str, database: Path | None = None) -> None:
    """A results folder belongs to one study: refuse (one line) to write study `name`'s tables or
    report into `out` when its config.json, or the SQLite `database` the command would add to, holds
    another study. So a quick run never rewrites the committed results/ of the full study."""
    config = out / "config.json"
    if config.is_file():
        import json

        try:
            found = json.loads(config.read_text(encoding="utf-8"))
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
