"""Tidy pandas tables built from the Optuna storage alone (so any worker, on any machine, can write them).

trials.csv  one row per tuning trial       (depth, trial, state, params, val_accuracy, cost, env)
epochs.csv  one row per trial and epoch    (train loss, validation loss/accuracy, seconds)
final.csv   one row per depth and seed     (retrained best configuration, test accuracy and loss)
superseded.csv  completed retraining runs left out of final.csv, each with its reason
"""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from mnist_bench.models import forward_flops, mlp, n_params, train_flops

from .config import parse_study_name, space_from_dict, study_name, widths_of
from .coord import SURPLUS, StudyError, best_trial, decode_curve

ENV_COLUMNS = ("device", "device_name", "cpu", "gpu", "threads", "torch_version", "python_version",
               "command", "worker")
STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def _cost(widths) -> dict:
    model = mlp([int(w) for w in widths])
    return {"widths": "-".join(str(int(w)) for w in widths), "n_params": n_params(model),
            "forward_flops": forward_flops(model), "train_flops": train_flops(model)}


def _env(t: optuna.trial.FrozenTrial) -> dict:
    env = t.user_attrs.get("env", {})
    return {k: env.get(k) for k in ENV_COLUMNS}


def load(storage, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(f"the storage has no study {name!r} (a study still being created, or another "
                         "--name)") from None


def study_tables(storage, name: str, depth: int) -> dict[str, pd.DataFrame]:
    """trials / epochs / final / superseded rows of one depth from `storage`.

    final holds the completed retraining runs of the current best tuning trial, one per seed;
    superseded holds every other completed retraining run with the reason it is left out (its source
    trial is no longer the best after the budget grew, or a duplicate seed written by an older
    protocol), so nothing is dropped silently."""
    tune = load(storage, study_name(name, depth))
    final = load(storage, study_name(name, depth, final=True))
    config = tune.user_attrs["config"]
    space = space_from_dict(config["space"])
    tuning = tune.get_trials(deepcopy=False)
    best = best_trial(tuning)
    fixed = {"batch_size": config["batch_size"], "optimizer": config["optimizer"], "momentum": config["momentum"]}
    trials, epochs, finals, superseded = [], [], [], []
    for t in tuning:
        if t.user_attrs.get(SURPLUS):
            continue  # lost a race for a budget slot; it ran nothing
        state = "diverged" if t.user_attrs.get("diverged") else STATES.get(t.state, t.state.name.lower())
        curve = decode_curve(t.user_attrs.get("curve"))
        vals = [c["val_accuracy"] for c in curve]
        trials.append({
            "study": tune.study_name, "depth": depth, "trial": t.number, "state": state,
            "retrained": best is not None and t.number == best.number,
            **{f"param_{k}": v for k, v in t.params.items()},
            "val_accuracy": t.value if state == "complete" else (vals[-1] if vals else None),
            "best_epoch_val_accuracy": max(vals) if vals else None, "epochs_run": len(curve),
            **(_cost(widths_of(depth, t.params, space)) if t.params else {}),
            "train_seconds": t.user_attrs.get("train_seconds"), "samples_per_s": t.user_attrs.get("samples_per_s"),
            **fixed, **_env(t),
        })
        epochs += [{"study": tune.study_name, "depth": depth, "trial": t.number, **c} for c in curve]
    seen: dict[int, int] = {}
    runs = final.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for t in sorted(runs, key=lambda t: t.number):
        if t.user_attrs.get(SURPLUS):
            continue
        a = t.user_attrs
        row = {
            "study": final.study_name, "depth": depth, "seed": a["seed"], "source_trial": a["source_trial"],
            "run_trial": t.number, **{k: v for k, v in a.items() if k.startswith("param_")}, **_cost(a["widths"]),
            **fixed, "test_accuracy": a["test_accuracy"], "test_loss": a["test_loss"], "diverged": a["diverged"],
            "train_seconds": a["train_seconds"], "samples_per_s": a["samples_per_s"],
            "curve": json.dumps(decode_curve(a.get("curve"))), **_env(t),
        }
        if best is None or a["source_trial"] != best.number:
            superseded.append({**row, "reason": f"source trial {a['source_trial']} is no longer the best"})
        elif a["seed"] in seen:
            superseded.append({**row, "reason": f"duplicate of seed {a['seed']} (run {seen[a['seed']]})"})
        else:
            seen[a["seed"]] = t.number
            finals.append(row)
    return {"trials": pd.DataFrame(trials), "epochs": pd.DataFrame(epochs), "final": pd.DataFrame(finals),
            "superseded": pd.DataFrame(superseded)}


TABLES = ("trials", "epochs", "final", "superseded")
EMPTY_COLUMNS = {
    "trials": ["study", "depth", "trial", "state", "retrained", "val_accuracy"],
    "epochs": ["study", "depth", "trial", "epoch", "train_loss", "val_loss", "val_accuracy", "train_seconds"],
    "final": ["study", "depth", "seed", "source_trial", "run_trial", "widths", "n_params", "train_flops",
              "test_accuracy", "test_loss", "diverged", "train_seconds", "samples_per_s", "curve"],
    "superseded": ["depth", "seed", "source_trial", "run_trial", "reason"],
}


def collect(storage, name: str, depths) -> dict[str, pd.DataFrame]:
    parts = [study_tables(storage, name, d) for d in depths]
    return {k: pd.concat([p[k] for p in parts], ignore_index=True) for k in TABLES}


def study_names(storage) -> dict[str, list[int]]:
    """{study name prefix: depths} for every depth study in `storage` (for reports read from storage)."""
    found: dict[str, list[int]] = {}
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        parsed = parse_study_name(s.study_name)
        if parsed:
            found.setdefault(parsed[0], []).append(parsed[1])
    return {k: sorted(v) for k, v in found.items()}


def write_tables(storage, name: str, depths, out: Path) -> dict[str, pd.DataFrame]:
    """trials/epochs/final.csv, superseded.csv (header only when none) and config.json (the study's
    fixed settings, search space and budgets)."""
    out.mkdir(parents=True, exist_ok=True)
    tables = collect(storage, name, depths)
    for key, df in tables.items():
        if df.empty and len(df.columns) == 0:  # a study still in progress: headers, no rows
            tables[key] = df = pd.DataFrame(columns=EMPTY_COLUMNS[key])
        df.to_csv(out / f"{key}.csv", index=False)
    first = load(storage, study_name(name, depths[0]))
    config = {k: v for k, v in first.user_attrs["config"].items() if k != "depth"}
    config |= {"depths": list(depths), "n_trials": first.user_attrs.get("n_trials"),
               "seeds": load(storage, study_name(name, depths[0], final=True)).user_attrs.get("seeds"),
               "superseded_final_runs": len(tables["superseded"])}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tables


def summary(final: pd.DataFrame) -> str:
    """One line per depth: test accuracy mean, spread and n over seeds, parameters, seconds."""
    lines = []
    for depth, g in final.groupby("depth"):
        acc = g["test_accuracy"].dropna()
        spread = f"+- {acc.std(ddof=1):.4f} " if len(acc) > 1 else ""
        diverged = f", {len(g) - len(acc)} diverged" if len(acc) < len(g) else ""
        mean = f"{acc.mean():.4f} " if len(acc) else "none "
        lines.append(f"depth {depth}: test accuracy {mean}{spread}(n={len(acc)}{diverged}), "
                     f"widths {g['widths'].iloc[0] or '-'}, {g['n_params'].iloc[0]:,} params, "
                     f"lr {g['param_lr'].iloc[0]:.3g}, {int(g['param_epochs'].iloc[0])} epochs, "
                     f"{g['train_seconds'].mean():.1f} s per run")
    return "\n".join(lines)
