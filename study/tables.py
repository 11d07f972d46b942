"""Tidy pandas tables built from the Optuna storage alone (so any worker, on any machine, can write
them); study.results reads them back for the report.

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
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from mnist_bench.errors import UserError
from mnist_bench.files import os_error, write_files
from mnist_bench.sizes import count_params, forward_flops, train_flops

from .config import (
    NEIGHBOURHOOD,
    PREDICTIONS_FILE,
    Cell,
    cell_widths,
    chooser,
    failed_run,
    final_runs,
    parse_study_name,
    refuse_grid_design,
    study_name,
)
from .coord import (
    CURVE_COLUMNS,
    FIXED,
    SURPLUS,
    band_choice,
    best_trial,
    decode_curve,
    decode_predictions,
    failed_trial,
    foreign,
    refuse_foreign,
)
from .storage import StudyError

CELL_COLUMNS = ["experiment", "budget", "shape", "variant", "depth"]  # what names a cell in every table
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
    hidden = [int(w) for w in widths]
    per_sample = train_flops(hidden)
    return {
        "widths": "-".join(str(w) for w in hidden),
        "n_params": count_params(hidden),
        "forward_flops": forward_flops(hidden),
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
    refuse_foreign(tune, made=True)  # another program's study, or one adopted by an older version: one line
    refuse_foreign(final)
    config = tune.user_attrs["config"]
    refuse_grid_design(cell.experiment, config["experiment"], f"study {name!r} in this storage")
    tuning = tune.get_trials(deepcopy=False)
    best = best_trial(tuning)
    point = None  # a matched check's band point: the one its base cell chooses now
    if cell.experiment == "tuned":
        source = best.number if best else None
    else:  # the recipe and the matched cells retrain no tuning trial
        source = FIXED
        if (by := chooser(cell)) != cell:
            point = band_choice(load(storage, study_name(name, by, final=True)).get_trials(deepcopy=False))
    places = {source: 0}  # a tuned cell also retrains its runners-up (Tuned.runners_up)
    if cell.experiment == "tuned":
        for place in range(1, int(config["experiment"].get("runners_up", 0)) + 1):
            if (other := best_trial(tuning, place)) is not None:
                places[other.number] = place
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
                "tuning_seed": t.user_attrs.get("tuning_seed"),
                "val_accuracy": t.value if t.state == TrialState.COMPLETE else (vals[-1] if vals else None),
                "val_correct": curve[-1]["val_correct"] if curve else None,  # of the last epoch, as val_accuracy
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
            "band_point": a.get("band_point"),
            "place": a.get("place", 0),
            "split_seed": a.get("split_seed"),
            "run_trial": t.number,
            **{k: v for k, v in a.items() if k.startswith("param_")},
            **_cost(a["widths"], a.get("samples_seen")),
            **fixed,
            "momentum": a.get("param_momentum", fixed["momentum"]),
            "test_accuracy": a["test_accuracy"],
            "test_correct": a.get("test_correct"),  # exact; runs stored before counts: empty
            "test_images": a.get("test_images"),
            "test_loss": a["test_loss"],
            "val_accuracy": a.get("val_accuracy"),  # the last epoch's (a factorial's rate is chosen by it)
            "val_correct": a.get("val_correct"),
            "diverged": a["diverged"],
            "failed": failed_run(_number(a["test_accuracy"]), _number(a["test_loss"]), a["diverged"]),
            "train_seconds": a["train_seconds"],
            "samples_per_s": a["samples_per_s"],
            "pack": a.get("pack"),  # networks trained in its pass (results do not depend on it)
            "started": _utc(t.datetime_start),
            "finished": _utc(t.datetime_complete),
            "curve": json.dumps(curve),
            **_env(t),
            PREDICTIONS: a.get("test_predictions"),  # exported to predictions.npz, not to final.csv
        }
        run = (a["source_trial"], a.get("band_point"), a["seed"])
        if a["source_trial"] not in places:
            superseded.append({**row, "reason": f"source trial {a['source_trial']} is no longer the best"})
        elif point is not None and a.get("band_point") != point:
            superseded.append(
                {**row, "reason": f"band point {a.get('band_point')} is no longer its base cell's choice"}
            )
        elif run in seen:
            superseded.append({**row, "reason": f"duplicate of seed {a['seed']} (run {seen[run]})"})
        else:
            seen[run] = t.number
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
OUTPUT_FILES = (*(f"{k}.csv" for k in TABLES), "config.json", PREDICTIONS_FILE)  # what write_tables writes
PREDICTIONS = "test_predictions"  # a final row's stored predictions on their way to PREDICTIONS_FILE


def predictions_file(final: pd.DataFrame, labels: dict[str, str]) -> bytes:
    """PREDICTIONS_FILE of the final runs (numpy's compressed npz): `study` and `run_trial` name each run (final.csv's
    columns), `predictions` (runs x test images, uint8) its predicted class of every test image, `labels` the test
    labels. Runs stored before predictions, and studies without stored labels, are left out."""
    import io

    import numpy as np

    rows = final[final[PREDICTIONS].notna()] if PREDICTIONS in final else final.iloc[:0]
    rows = rows[rows["study"].isin(labels)]
    found = {decode_predictions(t).tobytes() for t in labels.values()}
    if len(found) > 1:
        raise StudyError("the final studies hold different test labels: not one test set")
    preds = [decode_predictions(t) for t in rows[PREDICTIONS]] if PREDICTIONS in rows else []
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        study=rows["study"].to_numpy(str),
        run_trial=rows["run_trial"].to_numpy(np.int64),
        predictions=np.stack(preds) if preds else np.zeros((0, 0), np.uint8),
        labels=np.frombuffer(found.pop(), np.uint8) if found else np.zeros(0, np.uint8),
    )
    return buffer.getvalue()


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
    "epochs": ["study", "experiment", "budget", "shape", "variant", "depth", "run", "trial", "seed", *CURVE_COLUMNS],
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
        if parsed and foreign(s) is None:  # another program's study of such a name is not one of ours
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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {out} ({os_error(e)})") from None
    tables = collect(storage, name, cells)
    labels: dict[str, str] = {}
    experiments: dict[str, dict] = {}
    shared: dict = {}
    in_progress = []
    for cell in cells:
        tune = load(storage, study_name(name, cell))
        final = load(storage, study_name(name, cell, final=True))
        in_progress += progress(tune, final, cell, tables)
        if "test_labels" in final.user_attrs:
            labels[final.study_name] = final.user_attrs["test_labels"]
        config = dict(tune.user_attrs["config"])
        exp = experiments.setdefault(cell.experiment, {**config.pop("experiment"), "depths": [], "budgets": []})
        config.pop("cell")
        shared = config
        if cell.depth not in exp["depths"]:
            exp["depths"].append(cell.depth)
        if cell.budget is not None and cell.budget not in exp["budgets"]:
            exp["budgets"].append(cell.budget)
        if cell.experiment == "matched":  # a selection, like the budgets: the constant-width cells in the storage
            exp["constant_budgets"] = sorted({c.budget for c in cells if c.shape == "constant" and c.budget})
        seeds = load(storage, study_name(name, cell, final=True)).user_attrs.get("seeds")
        if cell.variant:  # a recipe variant or a matched check: their own seed budgets
            exp["variant_seeds" if cell.experiment == "recipe" else "check_seeds"] = seeds
        elif cell.experiment == "matched" and cell.depth not in NEIGHBOURHOOD:
            exp["reference_seeds"] = seeds  # a factorial's secondary references
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
    files: dict[str, str | bytes] = {PREDICTIONS_FILE: predictions_file(tables["final"], labels)}
    for key in ("final", "superseded"):
        tables[key] = tables[key].drop(columns=[PREDICTIONS], errors="ignore")
    files |= {f"{key}.csv": df.to_csv(index=False) for key, df in tables.items()}
    files["config.json"] = json.dumps(config, indent=2) + "\n"
    write_files(out, files)  # all of them or none: never a new final.csv beside an old epochs.csv
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
    runs = final_runs(cell, final.user_attrs.get("seeds") or 0, tune.user_attrs["config"]["experiment"])
    rows = tables["final"]
    done = int((rows["study"] == final.study_name).sum()) if len(rows) else 0
    if done < runs:
        out.append({"cell": cell.key, "what": "final runs", "done": done, "budget": runs})
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
