"""Tidy pandas tables built from the Optuna storage alone (so any worker, on any machine, can write
them), and read back for the report with every cell checked against what its column may hold.

Every row carries its `dataset`, `experiment` (recipe, matched, tuned), `budget` (matched: the
parameter budget) and `depth`:
trials.csv      one row per tuning trial        (state, params, validation accuracy, cost, env)
epochs.csv      one row per run and epoch       (tuning trials and final runs; `run` says which)
final.csv       one row per cell and seed       (the cell's retrained configuration, test accuracy and loss)
superseded.csv  completed final runs left out of final.csv, each with its reason
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from mnist_bench.errors import UsageError, UserError
from mnist_bench.models import forward_flops, mlp, n_params, train_flops
from mnist_bench.paths import DATASETS

from .config import CHECKS as CHECK_NAMES
from .config import (
    EXPERIMENTS,
    MAX_DEPTH,
    SHAPES,
    TRIAL_STATES,
    VARIANTS,
    Cell,
    cell_widths,
    chooser,
    failed_run,
    parse_study_name,
    study_name,
)
from .coord import FIXED, SURPLUS, best_trial, decode_curve, failed_trial
from .storage import StudyError

ENV_COLUMNS = ("device", "device_name", "cpu", "gpu", "threads", "torch_version", "python_version", "command", "worker")
# Optuna's states by the names of config.TRIAL_STATES ("failed" and "diverged" come from what a
# completed trial holds, in trial_state).
STATES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "interrupted",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def trial_state(t: optuna.trial.FrozenTrial) -> str:
    if t.user_attrs.get("diverged"):
        return "diverged"
    if failed_trial(t):
        return "failed"
    return STATES.get(t.state, t.state.name.lower())


def _cost(widths, samples: int | None) -> dict:
    model = mlp([int(w) for w in widths])
    per_sample = train_flops(model)
    return {
        "widths": "-".join(str(int(w)) for w in widths),
        "n_params": n_params(model),
        "forward_flops": forward_flops(model),
        "train_flops_per_sample": per_sample,
        "samples_seen": samples,
        "train_flops": per_sample * samples if samples is not None else None,
    }


def _trial_cost(cell: Cell, t: optuna.trial.FrozenTrial, settings: dict) -> dict:
    """Widths, parameters and FLOPs of a tuning trial; nothing for a trial stopped before it had
    suggested every hyperparameter its model needs (killed while suggesting: it trained nothing)."""
    if not t.params:
        return {}
    try:
        widths = cell_widths(cell, t.params, settings)
    except KeyError:
        return {}
    return _cost(widths, t.user_attrs.get("samples_seen"))


def _utc(when) -> str | None:
    """A trial's start or completion time (Optuna gives it naive, in this process's time zone) in UTC."""
    return when.astimezone(datetime.timezone.utc).isoformat(timespec="seconds") if when is not None else None


def _number(x) -> float:
    return float("nan") if x is None else float(x)


def _env(t: optuna.trial.FrozenTrial) -> dict:
    env = t.user_attrs.get("env", {})
    return {k: env.get(k) for k in ENV_COLUMNS}


def load(storage, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(
            f"the storage has no study {name!r} (a study still being created, or another --name)"
        ) from None


def study_tables(storage, name: str, cell: Cell) -> dict[str, pd.DataFrame]:
    """trials / epochs / final / superseded rows of one cell from `storage`.

    final holds the completed final runs of the cell's current best tuning trial (or, for the recipe,
    of the fixed recipe), one per seed; superseded holds every other completed final run with the
    reason it is left out (its source trial is no longer the best after the budget grew, or a
    duplicate seed written by an older protocol), so nothing is dropped silently."""
    tune = load(storage, study_name(name, cell))
    final = load(storage, study_name(name, cell, final=True))
    config = tune.user_attrs["config"]
    tuning = tune.get_trials(deepcopy=False)
    rule = config["experiment"].get("lr_rule", "mean")  # a grid's rule; studies stored before it: the mean
    best = best_trial(tuning, rule=rule)
    if cell.experiment == "recipe":
        source = FIXED
    else:  # a matched check retrains its base cell's choice (or runner-up)
        by = chooser(cell, config["experiment"])
        base = tuning if by == cell else load(storage, study_name(name, by)).get_trials(deepcopy=False)
        chosen = best_trial(base, cell.place, rule)
        source = chosen.number if chosen else None
    where = {
        "dataset": config.get("dataset", "mnist"),
        "experiment": cell.experiment,
        "budget": cell.budget,
        "shape": cell.shape,
        "variant": cell.variant,
        "depth": cell.depth,
    }
    fixed = {
        "batch_size": config["batch_size"],
        "optimizer": config["optimizer"],
        "momentum": config["experiment"].get("momentum", config["momentum"]),
        "schedule": "constant" if cell.experiment == "recipe" else config.get("schedule", "constant"),
    }
    trials, epochs, finals, superseded = [], [], [], []
    for t in tuning:
        if t.user_attrs.get(SURPLUS):
            continue  # lost a race for a budget slot; it ran nothing
        state = trial_state(t)
        curve = decode_curve(t.user_attrs.get("curve"))
        vals = [c["val_accuracy"] for c in curve]
        trials.append(
            {
                "study": tune.study_name,
                **where,
                "trial": t.number,
                "state": state,
                "retrained": best is not None and t.number == best.number,
                **{f"param_{k}": v for k, v in t.params.items()},
                "grid_point": t.user_attrs.get("grid"),
                "replicate": t.user_attrs.get("replicate"),
                "tuning_seed": t.user_attrs.get("tuning_seed"),
                "val_accuracy": t.value if t.state == TrialState.COMPLETE else (vals[-1] if vals else None),
                "best_epoch_val_accuracy": max(vals) if vals else None,
                "epochs_run": len(curve),
                **_trial_cost(cell, t, config["experiment"]),
                "train_seconds": t.user_attrs.get("train_seconds"),
                "samples_per_s": t.user_attrs.get("samples_per_s"),
                "started": _utc(t.datetime_start),
                "finished": _utc(t.datetime_complete),
                **fixed,
                **_env(t),
            }
        )
        epochs += [
            {"study": tune.study_name, **where, "run": "tuning", "trial": t.number, "seed": None, **c} for c in curve
        ]
    seen: dict[int, int] = {}
    runs = final.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for t in sorted(runs, key=lambda t: t.number):
        if t.user_attrs.get(SURPLUS):
            continue
        a = t.user_attrs
        curve = decode_curve(a.get("curve"))
        row = {
            "study": final.study_name,
            **where,
            "seed": a["seed"],
            "source_trial": a["source_trial"],
            "run_trial": t.number,
            **{k: v for k, v in a.items() if k.startswith("param_")},
            **_cost(a["widths"], a.get("samples_seen")),
            **fixed,
            "momentum": a.get("param_momentum", fixed["momentum"]),
            "test_accuracy": a["test_accuracy"],
            "test_loss": a["test_loss"],
            "diverged": a["diverged"],
            "failed": failed_run(_number(a["test_accuracy"]), _number(a["test_loss"]), a["diverged"]),
            "train_seconds": a["train_seconds"],
            "samples_per_s": a["samples_per_s"],
            "started": _utc(t.datetime_start),
            "finished": _utc(t.datetime_complete),
            "curve": json.dumps(curve),
            **_env(t),
        }
        if a["source_trial"] != source:
            superseded.append({**row, "reason": f"source trial {a['source_trial']} is no longer the best"})
        elif a["seed"] in seen:
            superseded.append({**row, "reason": f"duplicate of seed {a['seed']} (run {seen[a['seed']]})"})
        else:
            seen[a["seed"]] = t.number
            finals.append(row)
            epochs += [
                {"study": final.study_name, **where, "run": "final", "trial": t.number, "seed": a["seed"], **c}
                for c in curve
            ]
    return {
        "trials": pd.DataFrame(trials),
        "epochs": pd.DataFrame(epochs),
        "final": pd.DataFrame(finals),
        "superseded": pd.DataFrame(superseded),
    }


TABLES = ("trials", "epochs", "final", "superseded")
OUTPUT_FILES = (*(f"{k}.csv" for k in TABLES), "config.json")  # what write_tables writes
EMPTY_COLUMNS = {
    "trials": [
        "study",
        "experiment",
        "budget",
        "shape",
        "variant",
        "depth",
        "trial",
        "state",
        "retrained",
        "val_accuracy",
        "n_params",
        "param_lr",
    ],
    "epochs": [
        "study",
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
        "train_seconds",
        "test_accuracy",
    ],
    "final": [
        "study",
        "experiment",
        "budget",
        "shape",
        "variant",
        "depth",
        "seed",
        "source_trial",
        "run_trial",
        "widths",
        "n_params",
        "train_flops",
        "test_accuracy",
        "test_loss",
        "diverged",
        "failed",
        "train_seconds",
        "samples_per_s",
        "curve",
    ],
    "superseded": ["experiment", "budget", "shape", "variant", "depth", "seed", "source_trial", "run_trial", "reason"],
}


def collect(storage, name: str, cells) -> dict[str, pd.DataFrame]:
    parts = [study_tables(storage, name, c) for c in cells]
    out = {}
    for k in TABLES:
        frames = [p[k] for p in parts if not p[k].empty]
        out[k] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=EMPTY_COLUMNS[k])
        if "budget" in out[k]:
            out[k]["budget"] = out[k]["budget"].astype("Int64")  # 60000, not 60000.0; empty for no budget
    return out


def study_names(storage) -> dict[str, list[Cell]]:
    """{study name prefix: cells} for every depth study in `storage` (for reports read from storage)."""
    found: dict[str, list[Cell]] = {}
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        parsed = parse_study_name(s.study_name)
        if parsed:
            found.setdefault(parsed[0], []).append(parsed[1])
    return {
        k: sorted(
            v, key=lambda c: (c.experiment, bool(c.variant), c.variant, c.shape != "funnel", c.budget or 0, c.depth)
        )
        for k, v in found.items()
    }


def write_tables(storage, name: str, cells, out: Path) -> dict[str, pd.DataFrame]:
    """trials/epochs/final/superseded.csv and config.json (the study's fixed settings, each
    experiment's settings and budgets, and its cells)."""
    out.mkdir(parents=True, exist_ok=True)
    tables = collect(storage, name, cells)
    for key, df in tables.items():
        df.to_csv(out / f"{key}.csv", index=False)
    experiments: dict[str, dict] = {}
    shared: dict = {}
    in_progress = []
    for cell in cells:
        tune = load(storage, study_name(name, cell))
        in_progress += progress(tune, load(storage, study_name(name, cell, final=True)), cell, tables)
        config = dict(tune.user_attrs["config"])
        exp = experiments.setdefault(cell.experiment, {**config.pop("experiment"), "depths": [], "budgets": []})
        config.pop("cell")
        shared = config
        if cell.depth not in exp["depths"]:
            exp["depths"].append(cell.depth)
        if cell.budget is not None and cell.budget not in exp["budgets"]:
            exp["budgets"].append(cell.budget)
        seeds = load(storage, study_name(name, cell, final=True)).user_attrs.get("seeds")
        if cell.variant:  # a recipe variant or a matched check: their own seed budgets
            exp["variant_seeds" if cell.experiment == "recipe" else "check_seeds"] = seeds
        elif cell.budget is not None and cell.budget in exp.get("thin_budgets", []):
            exp["thin_seeds"] = seeds
        else:
            exp["n_trials"] = tune.user_attrs.get("n_trials")
            exp["seeds"] = seeds
    config = {
        "name": name,
        "dataset": "mnist",
        **shared,
        "experiments": experiments,
        "superseded_final_runs": len(tables["superseded"]),
        "in_progress": in_progress,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tables


def progress(tune: optuna.Study, final: optuna.Study, cell: Cell, tables: dict[str, pd.DataFrame]) -> list[dict]:
    """What of `cell` is below the budget the storage holds (the largest any command asked for): its
    tuning runs (the trained ones, for a search that replaces failed trials) and its final runs of the
    current choice. Empty when the cell is complete."""
    out = []
    budget = tune.user_attrs.get("n_trials") or 0
    if budget:
        ran = [t for t in tune.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        ran = [t for t in ran if not t.user_attrs.get(SURPLUS)]
        if cell.experiment == "tuned":  # failed trials are replaced, up to twice the budget
            trained = sum(trial_state(t) in ("complete", "pruned") for t in ran)
            done = budget if len(ran) >= 2 * budget else min(trained, budget)
        else:
            done = len(ran)
        if done < budget:
            out.append({"cell": cell.key, "what": "tuning runs", "done": done, "budget": budget})
    seeds = final.user_attrs.get("seeds") or 0
    rows = tables["final"]
    done = int((rows["study"] == final.study_name).sum()) if len(rows) else 0
    if done < seeds:
        out.append({"cell": cell.key, "what": "final runs", "done": done, "budget": seeds})
    return out


def summary(final: pd.DataFrame) -> str:
    """One line per cell: test accuracy mean, spread and n over trained seeds (failed runs counted
    apart), parameters, seconds."""
    lines = []
    for (experiment, budget, shape, variant, depth), g in final.groupby(CELL_COLUMNS, dropna=False, sort=False):
        acc = g[~g["failed"].astype(bool)]["test_accuracy"]
        spread = f"+- {acc.std(ddof=1):.4f} " if len(acc) > 1 else ""
        diverged = f", {len(g) - len(acc)} failed" if len(acc) < len(g) else ""
        mean = f"{acc.mean():.4f} " if len(acc) else "none "
        where = (
            f"{experiment}"
            + (f" {shape}" if shape != "funnel" else "")
            + (f" {variant}" if isinstance(variant, str) and variant else "")
            + (f" {int(budget):,} params" if pd.notna(budget) else "")
        )
        widths = g["widths"].iloc[0] if isinstance(g["widths"].iloc[0], str) and g["widths"].iloc[0] else "-"
        lines.append(
            f"{where}, depth {depth}: test accuracy {mean}{spread}(n={len(acc)}{diverged}), "
            f"widths {widths}, {int(g['n_params'].iloc[0]):,} params, "
            f"lr {g['param_lr'].iloc[0]:.3g}, {int(g['param_epochs'].iloc[0])} epochs, "
            f"{g['train_seconds'].mean():.1f} s per run"
        )
    return "\n".join(lines)


# --- reading them back: the report's input, every cell checked ---------------------------------------

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
}
CELL_COLUMNS = ["experiment", "budget", "shape", "variant", "depth"]  # what names a cell in every table
DTYPES = {"widths": "string", "command": "string", "budget": "Int64", "shape": "string", "variant": "string"}
# What a column may hold (checked on read, so a damaged cell is one line, never a wrong number);
# "!" marks a column that may not be empty.
CHECKS = {
    "trials": {
        "experiment": "experiment!",
        "shape": "shape!",
        "variant": "variant",
        "state": "state!",
        "depth": "depth!",
        "trial": "index!",
        "val_accuracy": "fraction",
        "best_epoch_val_accuracy": "fraction",
        "n_params": "count",
        "train_flops": "amount",
        "epochs_run": "index",
        "retrained": "flag!",
    },
    "epochs": {
        "experiment": "experiment!",
        "shape": "shape!",
        "variant": "variant",
        "depth": "depth!",
        "epoch": "count!",
        "seed": "count",
        "trial": "index",
        "val_accuracy": "fraction",
        "test_accuracy": "fraction",
        "train_loss": "number",
        "train_seconds": "amount",
    },
    "final": {
        "experiment": "experiment!",
        "shape": "shape!",
        "variant": "variant",
        "depth": "depth!",
        "seed": "count!",
        "test_accuracy": "fraction",
        "test_loss": "number",
        "n_params": "count!",
        "train_flops": "amount",
        "train_seconds": "amount",
        "diverged": "flag",
    },
    "throughput": {"samples_per_s": "positive!", "batch_size": "count!", "threads": "count!", "depth": "index!"},
}
NAMES = {  # columns that hold one of a few names
    "experiment": ("one of " + ", ".join(EXPERIMENTS), set(EXPERIMENTS)),
    "state": ("a trial state (" + ", ".join(TRIAL_STATES) + ")", set(TRIAL_STATES)),
    "shape": ("one of " + ", ".join(SHAPES), set(SHAPES)),
    "variant": ("empty or one of " + ", ".join([*VARIANTS, *CHECK_NAMES]), {"", *VARIANTS, *CHECK_NAMES}),
}
KINDS = {
    "depth": (f"a depth in 1..{MAX_DEPTH}", lambda x: x.between(1, MAX_DEPTH) & (x % 1 == 0)),
    "fraction": ("an accuracy in [0, 1]", lambda x: x.between(0, 1)),
    "count": ("a whole number of at least 1", lambda x: (x >= 1) & (x % 1 == 0)),
    "index": ("a whole number of at least 0", lambda x: (x >= 0) & (x % 1 == 0)),
    "amount": ("a number of at least 0", lambda x: x >= 0),
    "positive": ("a number above 0", lambda x: x > 0),
    "number": ("a number", lambda x: x == x),  # nan/inf are values here (a diverged loss)
}
FLAGS = {"True": True, "False": False, "true": True, "false": False, "1": True, "0": False, True: True, False: False}


def validate(df: pd.DataFrame, path: Path, checks: dict[str, str]) -> pd.DataFrame:
    """Columns as numbers of the kind `checks` says, or one line naming the file, row and column."""

    def refuse(col: str, i, what: str) -> None:
        row = df.index.get_loc(i) + 2  # line 1 is the header
        value = df[col][i]
        shown = "an empty cell" if pd.isna(value) else repr(value.item() if hasattr(value, "item") else value)
        raise UserError(f"{path} row {row}, column {col!r}: {shown} is not {what}")

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


def read_table(path: Path, required: tuple[str, ...] = (), checks: dict[str, str] | None = None) -> pd.DataFrame:
    """A CSV written by study.tables (or throughput), or one line saying what is wrong with it."""
    try:
        head = pd.read_csv(path, nrows=0).columns
        df = pd.read_csv(path, dtype={k: v for k, v in DTYPES.items() if k in head})
    except pd.errors.EmptyDataError:
        raise UserError(
            f"{path} is empty (0 bytes): regenerate it with python -m study.depth, or "
            "python -m study.report --storage URL"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise UserError(
            f"{path} is not a readable table ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if "experiment" in df:  # tables from before shapes and variants: every cell a funnel, as declared
        df["shape"] = df["shape"] if "shape" in df else "funnel"
        df["variant"] = df["variant"].fillna("") if "variant" in df else ""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(
            f"{path} has no column {missing[0]!r}: not a table written by study.depth (or written by "
            "an older version; regenerate with python -m study.report --storage URL --out DIR)"
        )
    df = validate(df, path, checks or {})
    if path.name == "final.csv" and {*CELL_COLUMNS, "seed"} <= set(df.columns):
        twice = df.duplicated([*CELL_COLUMNS, "seed"], keep="first")
        if twice.any():
            row = df.index.get_loc(twice.idxmax()) + 2
            raise UserError(f"{path} row {row}: a second run of the same cell and seed (one run per seed is counted)")
    return df


def read_optional(path: Path, checks: dict[str, str] | None = None) -> pd.DataFrame | None:
    return read_table(path, checks=checks) if path.is_file() else None


def load_results(results: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """(trials, epochs, final, config) of a results folder, or one line saying what is wrong."""
    missing = [f for f in ("trials.csv", "epochs.csv", "final.csv") if not (results / f).is_file()]
    if missing:
        raise UsageError(f"{results} has no {missing[0]}: run python -m study.depth first, or pass --storage")
    trials, epochs, final = (
        read_table(results / f"{k}.csv", REQUIRED[k], CHECKS[k]) for k in ("trials", "epochs", "final")
    )
    if final.empty:
        raise UserError(f"{results / 'final.csv'} has no rows: the study has no retrained runs yet (still tuning?)")
    config_path = results / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("experiments", {}), dict):
        raise UserError(f"{config_path} is not a study's config.json (an object with 'experiments')")
    if config.get("dataset", "mnist") not in DATASETS:
        raise UserError(f"{config_path}: unknown dataset {config.get('dataset')!r} (known: {', '.join(DATASETS)})")
    return trials, epochs, final, config
