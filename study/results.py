"""A results folder read back for the report: every table's cells checked against what their column may
hold, config.json against the study's typed settings, and the files against each other (every run the
config declares finished present, each run's curve in epochs.csv, the retrained trial marked), so a
report is rendered from tables that fit together or refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

import pandas as pd

from mnist_bench.errors import UsageError, UserError
from mnist_bench.files import os_error
from mnist_bench.paths import DATASETS

from .config import CHECKS as CHECK_NAMES
from .config import (
    EXPERIMENTS,
    MAX_DEPTH,
    SHAPES,
    TRIAL_STATES,
    VARIANTS,
    Cell,
    Matched,
    Recipe,
    StudyConfig,
    Tuned,
    failed_run,
    refuse_grid_design,
)
from .tables import CELL_COLUMNS

REQUIRED = {  # the columns the report reads
    "trials": ("experiment", "budget", "depth", "trial", "state", "retrained", "val_accuracy", "n_params"),
    "epochs": (
        "experiment",
        "budget",
        "shape",
        "variant",
        "depth",
        "run",
        "trial",
        "seed",
        "epoch",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "test_accuracy",
    ),
    "final": (
        "experiment",
        "budget",
        "shape",
        "variant",
        "depth",
        "seed",
        "test_accuracy",
        "widths",
        "n_params",
        "train_flops",
        "train_seconds",
    ),
    "throughput": ("pipeline", "model", "device", "threads", "batch_size", "samples_per_s"),
}
PACK_COLUMNS = ("pack", "batch_order", "speedup", "fraction_of_peak")  # what the packs figure reads of pack rows
KEYS = {  # what names one row of a table: a second row with the same key is refused, never counted twice
    "final": (
        [*CELL_COLUMNS, "seed"],
        "a second run of the same cell, configuration and seed (one run per seed is counted)",
    ),
    "trials": ([*CELL_COLUMNS, "trial"], "a second row of the same cell and trial number (one row per tuning trial)"),
    "epochs": (
        [*CELL_COLUMNS, "run", "trial", "seed", "epoch"],
        "a second row of the same run and epoch (one row per epoch of a run)",
    ),
}
# Columns that also name a row where a table has them: a factorial cell's band point, a tuned cell's runners-up.
OPTIONAL_KEYS = {"final": ["source_trial", "band_point"]}
DTYPES = {"widths": "string", "command": "string", "budget": "Int64", "shape": "string", "variant": "string"}
# What a column may hold (checked on read, so a damaged cell is one line, never a wrong number);
# "!" marks a column that may not be empty.
CHECKS = {
    "trials": {
        "experiment": "experiment!",
        "budget": "count",
        "shape": "shape!",
        "variant": "variant",
        "state": "state!",
        "depth": "depth!",
        "trial": "index!",
        "val_accuracy": "fraction",
        "val_correct": "index",
        "best_epoch_val_accuracy": "fraction",
        "n_params": "count",
        "train_flops": "amount",
        "train_seconds": "amount",
        "epochs_run": "index",
        "retrained": "flag!",
        "param_lr": "positive",
        "param_width": "count",
        "param_taper": "positive",
        "param_epochs": "count",
        "tuning_seed": "whole",
    },
    "epochs": {
        "experiment": "experiment!",
        "budget": "count",
        "shape": "shape!",
        "variant": "variant",
        "depth": "depth!",
        "run": "run!",
        "epoch": "count!",
        "seed": "count",
        "trial": "index",
        "val_accuracy": "fraction",
        "test_accuracy": "fraction",
        "val_correct": "index",
        "test_correct": "index",
        "train_loss": "number",
        "val_loss": "number",
        "train_seconds": "amount",
    },
    "final": {
        "experiment": "experiment!",
        "budget": "count",
        "shape": "shape!",
        "variant": "variant",
        "depth": "depth!",
        "seed": "count!",
        "source_trial": "trial",
        "run_trial": "index",
        "test_accuracy": "fraction",
        "test_correct": "index",
        "test_images": "count",
        "test_loss": "number",
        "n_params": "count!",
        "train_flops": "amount",
        "train_seconds": "amount",
        "param_lr": "positive",
        "param_epochs": "count",
        "diverged": "flag",
        "failed": "flag",
        "band_point": "index",
        "place": "index",
        "pack": "count",
        "split_seed": "whole",
        "val_accuracy": "fraction",
        "val_correct": "index",
    },
    "throughput": {
        "pipeline": "text!",
        "model": "text!",
        "device": "text!",
        "samples_per_s": "positive!",
        "batch_size": "count!",
        "threads": "count!",
        "depth": "index!",
        "pack": "count",
        "batch_order": "text",
        "speedup": "positive",
        "fraction_of_peak": "amount",
    },
}
NAMES = {  # columns that hold one of a few names
    "experiment": ("one of " + ", ".join(EXPERIMENTS), set(EXPERIMENTS)),
    "state": ("a trial state (" + ", ".join(TRIAL_STATES) + ")", set(TRIAL_STATES)),
    "shape": ("one of " + ", ".join(SHAPES), set(SHAPES)),
    "variant": ("empty or one of " + ", ".join([*VARIANTS, *CHECK_NAMES]), {"", *VARIANTS, *CHECK_NAMES}),
    "run": ("tuning or final", {"tuning", "final"}),
}
# Upper bounds: a cell beyond one is damaged, not measured (it would print as a 309-digit number, or overflow
# the statistics into warnings and nonsense). Whole numbers (seeds, trial numbers, epochs, budgets, parameter
# counts) fit a signed 32-bit integer: the largest the study makes is a model's parameter count, about 10^7 at
# most (widths up to 1,024, depth 8), so the bound is generous, and int64 sums and products of such numbers
# cannot overflow. Amounts (FLOPs, seconds, samples per second) are finite and below 1e30: the full study spends
# about 1e17 training FLOPs in all, and squares of 1e30 (a variance, a regression) stay far below float64's 1.8e308.
MAX_WHOLE = 2**31 - 1
MAX_AMOUNT = 1e30
KINDS = {
    "depth": (f"a depth in 1..{MAX_DEPTH}", lambda x: x.between(1, MAX_DEPTH) & (x % 1 == 0)),
    "fraction": ("an accuracy in [0, 1]", lambda x: x.between(0, 1)),
    "count": (f"a whole number from 1 to {MAX_WHOLE:,}", lambda x: x.between(1, MAX_WHOLE) & (x % 1 == 0)),
    "index": (f"a whole number from 0 to {MAX_WHOLE:,}", lambda x: x.between(0, MAX_WHOLE) & (x % 1 == 0)),
    "trial": (
        f"a trial number from -1 (the recipe, nothing tuned) to {MAX_WHOLE:,}",
        lambda x: x.between(-1, MAX_WHOLE) & (x % 1 == 0),
    ),
    "whole": (f"a whole number within ±{MAX_WHOLE:,}", lambda x: x.between(-MAX_WHOLE, MAX_WHOLE) & (x % 1 == 0)),
    "amount": (f"a number from 0 to below {MAX_AMOUNT:g}", lambda x: (x >= 0) & (x < MAX_AMOUNT)),
    "positive": (f"a number above 0 and below {MAX_AMOUNT:g}", lambda x: (x > 0) & (x < MAX_AMOUNT)),
    "number": ("a number", lambda x: x == x),  # nan/inf are values here (a diverged loss)
}
FLAGS = {"True": True, "False": False, "true": True, "false": False, "1": True, "0": False, True: True, False: False}
REGENERATE = "python -m study.report --storage URL --out DIR"  # rewrites a folder's tables and config.json


def row_of(df: pd.DataFrame, i) -> int:
    """The line of `df`'s row `i` in its CSV file (line 1 is the header)."""
    return df.index.get_loc(i) + 2


def validate(df: pd.DataFrame, path: Path, checks: dict[str, str]) -> pd.DataFrame:
    """Columns as numbers of the kind `checks` says, or one line naming the file, row and column."""

    def refuse(col: str, i, what: str) -> None:
        value = df[col][i]
        shown = "an empty cell" if pd.isna(value) else repr(value.item() if hasattr(value, "item") else value)
        raise UserError(f"{path} row {row_of(df, i)}, column {col!r}: {shown} is not {what}")

    for col, kind in checks.items():
        if col not in df:
            continue
        required, kind = kind.endswith("!"), kind.rstrip("!")
        raw = df[col]
        if required and raw.isna().any():
            refuse(col, raw.isna().idxmax(), "allowed to be empty")
        if kind in NAMES:
            what, allowed = NAMES[kind]
            bad = raw.notna() & ~raw.isin(allowed)
            if bad.any():
                refuse(col, bad.idxmax(), what)
            continue
        if kind == "text":  # read as written: a column of digits is still words to join
            df[col] = raw.map(lambda v: v if pd.isna(v) else str(v)).astype(object)
            continue
        if kind == "flag":
            bad = raw.notna() & ~raw.map(lambda v: isinstance(v, (bool, str)) and v in FLAGS)
            if bad.any():
                refuse(col, bad.idxmax(), "True or False")
            df[col] = raw.map(lambda v: FLAGS.get(v, v) if isinstance(v, (bool, str)) else v)
            continue
        num = pd.to_numeric(raw, errors="coerce")
        what, ok = KINDS[kind]
        bad = (raw.notna() & num.isna() & (raw.astype(str).str.lower() != "nan")) | (num.notna() & ~ok(num))
        if kind != "number":
            bad |= num.isin([math.inf, -math.inf])
        if bad.any():
            refuse(col, bad.idxmax(), what)
        df[col] = num
    return df


STUDY_TABLE = (
    "study.depth (or written by an older version; regenerate with python -m study.report --storage URL --out DIR)"
)


def read_table(
    path: Path, required: tuple[str, ...] = (), checks: dict[str, str] | None = None, written_by: str = STUDY_TABLE
) -> pd.DataFrame:
    """A CSV written by study.tables (or throughput: `written_by` names the command), or one line saying what
    is wrong with it."""
    try:
        head = pd.read_csv(path, nrows=0, encoding="utf-8").columns
        df = pd.read_csv(path, dtype={k: v for k, v in DTYPES.items() if k in head}, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise UserError(
            f"{path} is empty (0 bytes): regenerate it with python -m study.depth, or "
            "python -m study.report --storage URL"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, TypeError, OverflowError) as e:
        raise UserError(
            f"{path} is not a readable table ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({os_error(e)})") from None
    if "experiment" in df:  # tables from before shapes and variants: every cell a funnel, as declared
        df["shape"] = df["shape"] if "shape" in df else "funnel"
        df["variant"] = df["variant"].fillna("") if "variant" in df else ""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path} has no column {missing[0]!r}: not a table written by {written_by}")
    df = validate(df, path, checks or {})
    key, why = KEYS.get(path.stem, (None, ""))
    if key is not None and set(key) <= set(df.columns):
        key = key + [c for c in OPTIONAL_KEYS.get(path.stem, []) if c in df.columns]
        twice = df.duplicated(key, keep="first")
        if twice.any():
            raise UserError(f"{path} row {row_of(df, twice.idxmax())}: {why}")
    return df


def read_throughput(path: Path) -> pd.DataFrame | None:
    """throughput.csv beside the tables (mnist_bench.throughput's), or None where there is none; the columns
    the throughput and packs figures read, or one line naming the one that is missing."""
    if not path.is_file():
        return None
    written_by = "python -m mnist_bench.throughput (run it again to rewrite it)"
    df = read_table(path, REQUIRED["throughput"], CHECKS["throughput"], written_by)
    if "speedup" in df and (df["pipeline"] == "pack").any():
        missing = [c for c in PACK_COLUMNS if c not in df]
        if missing:
            raise UserError(f"{path} has pack rows but no column {missing[0]!r}: not a table written by {written_by}")
    return df


# --- config.json: read against the dataclasses that define a study ---------------------------------------
#
# config.json is StudyConfig as write_tables stores it: the study-level fields at the top, and under
# "experiments" each experiment's dataclass (Recipe, Matched, Tuned; the tuned search's SearchSpace nested) with
# the cells' run budgets filled in. The dataclasses' own field types are the schema: a value of another type is
# one line naming its key, never a traceback in the report's arithmetic.

EXPERIMENT_CLASSES = {"recipe": Recipe, "matched": Matched, "tuned": Tuned}
WRITTEN = {  # what write_tables adds to an experiment's stored settings (run budgets: null where none was stored)
    "depths": tuple[int, ...],
    "budgets": tuple[int, ...],
    **dict.fromkeys(("n_trials", "seeds", "variant_seeds", "check_seeds"), int | None),
}
SEEDS_OF_THE_DRAW = ("split_seed", "tuning_seed", "sampler_seed")  # whole numbers that may be negative
POSITIVE = ("lr", "width", "taper", "funnel", "variant_lr", "budgets", "constant_budgets", "band")
PROGRESS = {"cell": str, "what": str, "done": int, "budget": int}  # an in_progress entry (tables.progress)
PROGRESS_WHAT = ("tuning runs", "final runs")


def _word(hint) -> str:
    """What a JSON value of type `hint` is called, without an article."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            inner = _word(args[0])
            return f"list of {inner}s" if not inner.startswith("[") else f"list of {inner} lists"
        return "[" + ", ".join(_word(a) for a in args) + "]"
    if dataclasses.is_dataclass(hint):
        return "object with " + ", ".join(f.name for f in dataclasses.fields(hint))
    return {int: "whole number", float: "number", str: "string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _describe(hint) -> str:
    """What a JSON value of type `hint` should be, in words: "a list [number, number]", "a whole number or null"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_describe(a) for a in kinds) + (" or null" if type(None) in typing.get_args(hint) else "")
    word = _word(hint)
    if word.startswith("["):
        return f"a list {word}"
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fits(value, hint) -> bool:
    """Whether `value`, read from JSON, is a value of the dataclass field type `hint` (a list for a tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_WHOLE
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value) and abs(value) < MAX_AMOUNT
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)  # its fields are checked one by one, each named
    return True


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _numbers(value):
    """Every number inside a JSON value."""
    if isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _check_fields(d: dict, cls, where: str, path: Path, extra: dict | None = None) -> dict:
    """Each key of `d` that is a field of dataclass `cls` (or of `extra`, {key: type}) holds a value of its type
    and range; returns the fields' values as the dataclass takes them (lists as tuples). Other keys are left
    alone: a setting of an older or newer design is not this check's to refuse."""
    hints = {**typing.get_type_hints(cls), **(extra or {})}
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, hint in hints.items():
        if key not in d:
            continue
        value, named = d[key], f"{where}{key}"
        if not _fits(value, hint):
            raise UserError(f"{path}: {named} is {_shown(value)}, not {_describe(hint)}")
        if dataclasses.is_dataclass(hint):
            value = hint(**_check_fields(value, hint, f"{named}.", path))
        elif key == "depths" and not all(1 <= v <= MAX_DEPTH for v in value):
            raise UserError(f"{path}: {named} is {_shown(value)}, not a list of depths in 1..{MAX_DEPTH}")
        elif key == "claims" and not all(1 <= dep <= MAX_DEPTH and ep >= 1 and 0 <= acc <= 1 for dep, ep, acc in value):
            raise UserError(f"{path}: {named} is {_shown(value)}, not a list of [depth, epochs, accuracy in [0, 1]]")
        elif key in POSITIVE and any(v <= 0 for v in _numbers(value)):
            raise UserError(f"{path}: {named} is {_shown(value)}, not above 0")
        elif key not in SEEDS_OF_THE_DRAW and any(v < 0 for v in _numbers(value)):
            raise UserError(f"{path}: {named} is {_shown(value)}, not 0 or more")
        elif key == "variants" and not set(value) <= set(VARIANTS):
            raise UserError(f"{path}: {named} is {_shown(value)}, not a list of {', '.join(VARIANTS)}")
        elif key == "checks" and not set(value) <= set(CHECK_NAMES):
            raise UserError(f"{path}: {named} is {_shown(value)}, not a list of {', '.join(CHECK_NAMES)}")
        if key in names:
            values[key] = jsonable_tuples(value)
    return values


def jsonable_tuples(x):
    """Lists to tuples, recursively: a JSON value as the dataclass holds it (config.jsonable's inverse)."""
    if isinstance(x, list):
        return tuple(jsonable_tuples(v) for v in x)
    return x


def study_config(config: dict, path: Path) -> StudyConfig:
    """The study config.json describes, built as the study builds it (StudyConfig and its experiments'
    dataclasses, each key checked against its field's type and range), or one line naming the first key that
    does not fit. A key config.json lacks takes its dataclass's default."""
    top = {f.name for f in dataclasses.fields(StudyConfig)} - {"experiments", *EXPERIMENT_CLASSES}
    extra = {"superseded_final_runs": int}
    values = _check_fields({k: v for k, v in config.items() if k in top or k in extra}, StudyConfig, "", path, extra)
    exps = config.get("experiments", {})
    unknown = [k for k in exps if k not in EXPERIMENT_CLASSES]
    if unknown:
        raise UserError(f"{path}: experiments has {unknown[0]!r}, not one of {', '.join(EXPERIMENTS)}")
    parts = {}
    for name, settings in exps.items():
        cls = EXPERIMENT_CLASSES[name]
        if not isinstance(settings, dict):
            raise UserError(f"{path}: experiments.{name} is {_shown(settings)}, not {_describe(cls)}")
        parts[name] = _check_fields(settings, cls, f"experiments.{name}.", path, WRITTEN)
    pending = config.get("in_progress", [])
    if not isinstance(pending, list):
        raise UserError(
            f"{path}: in_progress is {_shown(pending)}, not a list of objects with cell, what, done, budget"
        )
    for i, p in enumerate(pending):
        fits = isinstance(p, dict) and all(_fits(p.get(k), t) for k, t in PROGRESS.items())
        if not fits or p["what"] not in PROGRESS_WHAT or p["done"] < 0 or p["budget"] < 0:
            raise UserError(
                f"{path}: in_progress[{i}] is {_shown(p)}, not an object with cell (a cell's name), what "
                f"({' or '.join(PROGRESS_WHAT)}), done and budget (whole numbers)"
            )
    try:
        return StudyConfig(
            **values,
            experiments=tuple(exps),
            **{name: EXPERIMENT_CLASSES[name](**fields) for name, fields in parts.items()},
        )
    except (UsageError, TypeError, ValueError) as e:  # a dataclass's own check (__post_init__)
        raise UserError(f"{path}: {e}") from None


def read_config(path: Path) -> tuple[dict, StudyConfig]:
    """config.json as read (the report quotes its settings) and the study it describes, or one line."""
    if not path.is_file():
        raise UserError(
            f"{path.parent} has no config.json (the study's settings, cells and seeds: without it the report would "
            f"guess them): regenerate the tables and config.json from the study's storage with {REGENERATE}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(
            f"{path} is not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({os_error(e)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("experiments", {}), dict):
        raise UserError(f"{path} is not a study's config.json (an object with 'experiments')")
    if config.get("dataset", "mnist") not in DATASETS:
        raise UserError(f"{path}: unknown dataset {config.get('dataset')!r} (known: {', '.join(DATASETS)})")
    return config, study_config(config, path)


def refuse_grid_results(results: Path) -> None:
    """One line for a results folder whose config.json is of the grid design (a matched experiment without a
    band, which this version no longer reports); anything else wrong with the file is left to read_config,
    which load_results calls after this."""
    try:
        config = json.loads((results / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return
    exps = config.get("experiments") if isinstance(config, dict) else None
    if isinstance(exps, dict) and "matched" in exps:
        refuse_grid_design("matched", exps["matched"], f"the study in {results}")


# --- the files of one folder, against each other ---------------------------------------------------------


def row_cells(df: pd.DataFrame) -> list[Cell]:
    """The cell of each row of a table (validated: CELL_COLUMNS hold names and whole numbers)."""
    return [
        Cell(e, int(d), None if pd.isna(b) else int(b), s, v if isinstance(v, str) else "")
        for e, b, s, v, d in zip(*(df[c] for c in CELL_COLUMNS), strict=True)
    ]


def _whole(x) -> int | None:
    return None if pd.isna(x) else int(x)


FIT = f"the files do not fit together; regenerate them from the study's storage with {REGENERATE}"


def _count(keys) -> dict:
    out: dict = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return out


def _fit_config(
    paths: dict[str, Path], cells: dict[str, list[Cell]], trials: pd.DataFrame, config: dict, cfg: StudyConfig
) -> None:
    """config.json against the tables: every part of a cell it does not list in progress is finished, so the
    tables hold all its final runs (its seeds) and all its tuning trials (its budget); a part in progress holds
    the final runs config.json counted."""
    pending = {(p["cell"], p["what"]): p for p in config.get("in_progress", [])}
    runs = _count(cells["final"])
    finished = trials["state"].isin(["complete", "failed", "diverged", "pruned"])  # what progress() counts as run
    tuned = _count(cell for cell, done in zip(cells["trials"], finished, strict=True) if done)
    present = set(cells["final"]) | set(cells["trials"]) | set(cells["epochs"])
    for cell in cfg.cells():
        # A declared cell with no row in any table is skipped: the experiments' depths and budgets are the union
        # of what every command selected, which may name combinations no command ran; a table cut, or a file
        # from another run, still leaves the cell in the other tables.
        if cell not in present:
            continue
        entry = pending.get((cell.key, "final runs"))
        seeds, n = cfg.final_runs(cell), runs.get(cell, 0)
        if entry is not None and n != entry["done"]:
            raise UserError(
                f"{paths['final']} has {n} final runs of {cell.key}, where config.json records {entry['done']} of "
                f"{entry['budget']} done: {FIT}"
            )
        if entry is None and isinstance(seeds, int) and n < seeds:
            raise UserError(
                f"{paths['final']} has {n} of the {seeds} final runs of {cell.key} ({seeds - n} missing), which "
                f"config.json declares finished (it lists no final runs of that cell in progress): {FIT}"
            )
        budget, n = cfg.n_trials(cell), tuned.get(cell, 0)
        if (cell.key, "tuning runs") not in pending and isinstance(budget, int) and n < budget:
            raise UserError(
                f"{paths['trials']} has {n} of the {budget} tuning trials of {cell.key}, which config.json "
                f"declares finished (it lists no tuning runs of that cell in progress): {FIT}"
            )


def _curve_lengths(final: pd.DataFrame, path: Path) -> pd.Series:
    """Each final run's number of epochs, from final.csv's `curve` (empty where it has none)."""
    curves = final["curve"] if "curve" in final else pd.Series(math.nan, index=final.index)
    lengths = []
    for i, curve in curves.items():
        try:
            lengths.append(math.nan if pd.isna(curve) else len(json.loads(curve)) or math.nan)
        except (ValueError, TypeError, RecursionError):
            raise UserError(f"{path} row {row_of(final, i)}, column 'curve': not a JSON list of epochs") from None
    return pd.Series(lengths, index=final.index)  # an empty curve (a run recorded without one) has no rows


def _fit_epochs(
    paths: dict[str, Path],
    cells: dict[str, list[Cell]],
    epochs: pd.DataFrame,
    runs: pd.DataFrame,
    run: str,
    lengths: pd.Series,
) -> None:
    """epochs.csv against the table of its `run` kind ("final": final.csv by seed; "tuning": trials.csv by trial):
    each run's epochs (`lengths`, empty where unknown), and no run that table does not list."""
    table, column = ("final", "seed") if run == "final" else ("trials", "trial")
    what = "the final run of {cell}, seed {n}" if run == "final" else "tuning trial {n} of {cell}"
    own = column
    if run == "final" and "run_trial" in runs and runs["run_trial"].notna().all():
        # a cell may hold several runs of one seed (a factorial's rates): match each by its own trial number
        column, own, what = "trial", "run_trial", "the final run of {cell}, seed {seed} (trial {n})"
    rows = epochs["run"] == run
    kept = _count((cell, _whole(n)) for cell, n, r in zip(cells["epochs"], epochs[column], rows) if r)
    seed_of = {
        (cell, _whole(n)): _whole(s)
        for cell, n, s, r in zip(cells["epochs"], epochs[column], epochs["seed"], rows)
        if r
    }
    listed = set()
    for i, cell, n, length in zip(runs.index, cells[table], runs[own], lengths, strict=True):
        key = (cell, _whole(n))
        listed.add(key)
        if pd.notna(length) and kept.get(key, 0) != length:
            seed = _whole(runs["seed"][i]) if "seed" in runs else None
            raise UserError(
                f"{paths['epochs']} has {kept.get(key, 0)} of the {int(length)} epochs of "
                f"{what.format(cell=cell.key, n=key[1], seed=seed)} ({paths[table].name} row {row_of(runs, i)}): {FIT}"
            )
    for cell, n in kept:
        if (cell, n) not in listed:
            raise UserError(
                f"{paths['epochs']} has epochs of {what.format(cell=cell.key, n=n, seed=seed_of[(cell, n)])}, which "
                f"{paths[table].name} does not list: {FIT}"
            )


def _fit_retrained(
    paths: dict[str, Path], cells: dict[str, list[Cell]], trials: pd.DataFrame, final: pd.DataFrame
) -> None:
    """`retrained` marks the tuning trial a cell's final runs retrain (its best by validation, the one every worker
    retrains): at most one per cell and, where the cell has final runs, the trial their `source_trial` names (only
    a tuned search has tuning trials; a runner-up's runs retrain another on purpose)."""
    marked: dict[Cell, list[int]] = {}
    for cell, trial, flag in zip(cells["trials"], trials["trial"], trials["retrained"], strict=True):
        marked.setdefault(cell, [])
        if flag is True:
            marked[cell].append(int(trial))
    runs = _count(cells["final"])
    sources: dict[Cell, set] = {}
    if "source_trial" in final:
        place = final["place"].fillna(0) if "place" in final else pd.Series(0, index=final.index)
        for cell, source, p in zip(cells["final"], final["source_trial"], place, strict=True):
            if pd.notna(source) and p == 0:  # a tuned cell's runners-up retrain other trials on purpose
                sources.setdefault(cell, set()).add(int(source))
    for cell, numbers in marked.items():
        named = ", ".join(map(str, sorted(sources.get(cell, ()))))
        if len(numbers) > 1:
            raise UserError(
                f"{paths['trials']} marks {len(numbers)} trials of {cell.key} as retrained (trials "
                f"{', '.join(map(str, numbers[:4]))}); a cell retrains one: {FIT}"
            )
        if cell not in runs:
            continue
        if not numbers:
            raise UserError(
                f"{paths['trials']} marks no trial of {cell.key} as retrained, yet {paths['final'].name} holds "
                f"{runs[cell]} runs retrained" + (f" from its trial {named}" if named else "") + f": {FIT}"
            )
        if named and sources[cell] != {numbers[0]}:
            raise UserError(
                f"{paths['trials']} marks trial {numbers[0]} of {cell.key} as retrained, but its final runs in "
                f"{paths['final'].name} retrain trial {named}: {FIT}"
            )


def _fit_counts(path: Path, final: pd.DataFrame) -> None:
    """A run's accuracy is its count of correct test images over their number, where both are recorded (runs
    stored before counts have neither): an edited accuracy no longer matches the count it came from."""
    if not {"test_correct", "test_images"} <= set(final.columns):
        return
    has = final["test_correct"].notna() & final["test_images"].notna()
    if (has & (final["test_correct"] > final["test_images"])).any():
        i = (has & (final["test_correct"] > final["test_images"])).idxmax()
        raise UserError(f"{path} row {row_of(final, i)}: more correct test images than test images")
    derived = final["test_correct"] / final["test_images"]
    off = has & ((final["test_accuracy"] - derived).abs() > 1e-9)
    if off.any():
        i = off.idxmax()
        raise UserError(
            f"{path} row {row_of(final, i)}: test_accuracy {final['test_accuracy'][i]!r} is not test_correct / "
            f"test_images ({int(final['test_correct'][i])} / {int(final['test_images'][i])}): {FIT}"
        )


def _fit_failures(path: Path, final: pd.DataFrame) -> None:
    """Only a run that diverged has no test accuracy (the trainer evaluates every other run); and where the
    table says whether a run failed, that is what its accuracy, loss and `diverged` say (config.failed_run):
    an edited row reads as a refusal, never as a quiet failure in the counts."""
    acc = final["test_accuracy"]  # validated: numbers, and the flags True or False (CHECKS)
    diverged = (
        final["diverged"].fillna(False).astype(bool) if "diverged" in final else pd.Series(False, index=final.index)
    )
    missing = acc.isna() & ~diverged
    if missing.any():
        i = missing.idxmax()
        raise UserError(f"{path} row {row_of(final, i)}: no test accuracy on a run that did not diverge: {FIT}")
    if "failed" not in final:
        return
    loss = final["test_loss"] if "test_loss" in final else acc * 0.0
    said = final["failed"]
    for i in final.index:
        if pd.notna(said[i]) and bool(said[i]) != failed_run(acc[i], loss[i], diverged[i]):
            raise UserError(
                f"{path} row {row_of(final, i)}: failed is {bool(said[i])}, but its test accuracy, loss and diverged "
                f"say {not bool(said[i])}: {FIT}"
            )


def check_fit(
    results: Path, trials: pd.DataFrame, epochs: pd.DataFrame, final: pd.DataFrame, config: dict, cfg: StudyConfig
) -> None:
    """The tables and config.json of one folder describe the same runs, or one line saying where they part: a
    table cut, a row edited or a file from another run reads as a refusal, never as a smaller study.

    Every folder: epochs.csv holds each final run's curve and no other final run. A folder as write_tables
    writes it (its tables name each row's `study`, its config.json lists what is `in_progress`), also: every
    part config.json does not list in progress is in the tables whole, each tuning trial's epochs are in
    epochs.csv, and `retrained` names the trial each cell's final runs retrain. (Tables from before those
    columns, or assembled by hand for a test, carry neither and get the first check only.)"""
    paths = {k: results / f"{k}.csv" for k in ("trials", "epochs", "final")}
    cells = {"trials": row_cells(trials), "epochs": row_cells(epochs), "final": row_cells(final)}
    written = "in_progress" in config or any("study" in df for df in (trials, epochs, final))
    if written:
        _fit_config(paths, cells, trials, config, cfg)
    _fit_epochs(paths, cells, epochs, final, "final", _curve_lengths(final, paths["final"]))
    _fit_counts(paths["final"], final)
    _fit_failures(paths["final"], final)
    if written:
        ran = trials["epochs_run"] if "epochs_run" in trials else pd.Series(math.nan, index=trials.index)
        _fit_epochs(paths, cells, epochs, trials, "tuning", ran)
        _fit_retrained(paths, cells, trials, final)


def load_results(results: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """(trials, epochs, final, config) of a results folder, or one line saying what is wrong: a table or
    config.json that is missing, unreadable or of the wrong type, or files that do not fit together."""
    folders = [f for f in ("trials.csv", "epochs.csv", "final.csv") if (results / f).is_dir()]
    if folders:
        raise UserError(f"{results / folders[0]} is a folder, not a table")
    missing = [f for f in ("trials.csv", "epochs.csv", "final.csv") if not (results / f).is_file()]
    if missing:
        raise UsageError(f"{results} has no {missing[0]}: run python -m study.depth first, or pass --storage")
    refuse_grid_results(results)  # before its tables are read: they hold what this version cannot read
    trials, epochs, final = (
        read_table(results / f"{k}.csv", REQUIRED[k], CHECKS[k]) for k in ("trials", "epochs", "final")
    )
    if final.empty:
        raise UserError(f"{results / 'final.csv'} has no rows: the study has no retrained runs yet (still tuning?)")
    config, cfg = read_config(results / "config.json")
    check_fit(results, trials, epochs, final, config, cfg)
    return trials, epochs, final, config
