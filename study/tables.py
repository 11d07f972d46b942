"""Tidy pandas tables built from the Optuna storage alone (so any worker, on any machine, can write them).

trials.csv  one row per tuning trial       (depth, trial, state, params, val_accuracy, cost, env)
epochs.csv  one row per trial and epoch    (train loss, validation loss/accuracy, seconds)
final.csv   one row per depth and seed     (retrained best configuration, test accuracy and loss)
"""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from mnist_bench.models import forward_flops, mlp, n_params, train_flops

CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "train_seconds")
ENV_COLUMNS = ("device", "device_name", "cpu", "gpu", "threads", "torch_version", "python_version",
               "command", "worker")
STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def _cost(widths: list[int]) -> dict:
    model = mlp(widths)
    return {"widths": "-".join(map(str, widths)), "n_params": n_params(model),
            "forward_flops": forward_flops(model), "train_flops": train_flops(model)}


def _env(t: optuna.trial.FrozenTrial) -> dict:
    env = t.user_attrs.get("env", {})
    return {k: env.get(k) for k in ENV_COLUMNS}


def _widths(depth: int, params: dict, config: dict) -> list[int]:
    from study.depth import SearchSpace, widths_of

    space = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["space"].items()})
    return list(widths_of(depth, params, space))


def study_tables(storage, name: str, depth: int) -> dict[str, pd.DataFrame]:
    """trials / epochs / final rows of one depth from `storage` (studies f"{name}-depth{depth}[-final]")."""
    tune = optuna.load_study(study_name=f"{name}-depth{depth}", storage=storage)
    final = optuna.load_study(study_name=f"{name}-depth{depth}-final", storage=storage)
    config = tune.user_attrs["config"]
    trials, epochs, finals = [], [], []
    for t in tune.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue  # lost a race for a budget slot; it ran nothing
        state = "diverged" if t.user_attrs.get("diverged") else STATES.get(t.state, t.state.name.lower())
        curve = [dict(zip(CURVE_COLUMNS, row)) for row in t.user_attrs.get("curve", [])]
        vals = [c["val_accuracy"] for c in curve]
        trials.append({
            "study": tune.study_name, "depth": depth, "trial": t.number, "state": state,
            **{f"param_{k}": v for k, v in t.params.items()},
            "val_accuracy": t.value if state == "complete" else (vals[-1] if vals else None),
            "best_epoch_val_accuracy": max(vals) if vals else None, "epochs_run": len(curve),
            **(_cost(_widths(depth, t.params, config)) if t.params else {}),
            "train_seconds": t.user_attrs.get("train_seconds"), "samples_per_s": t.user_attrs.get("samples_per_s"),
            "batch_size": config["batch_size"], "optimizer": config["optimizer"],
            "momentum": config["momentum"], **_env(t),
        })
        epochs += [{"study": tune.study_name, "depth": depth, "trial": t.number, **c} for c in curve]
    for t in final.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("surplus"):
            continue
        a = t.user_attrs
        finals.append({
            "study": final.study_name, "depth": depth, "seed": a["seed"], "source_trial": a["source_trial"],
            **{k: v for k, v in a.items() if k.startswith("param_")}, **_cost(a["widths"]),
            "batch_size": config["batch_size"], "optimizer": config["optimizer"], "momentum": config["momentum"],
            "test_accuracy": a["test_accuracy"], "test_loss": a["test_loss"], "diverged": a["diverged"],
            "train_seconds": a["train_seconds"], "samples_per_s": a["samples_per_s"],
            "curve": json.dumps(a.get("curve", [])), **_env(t),
        })
    return {"trials": pd.DataFrame(trials), "epochs": pd.DataFrame(epochs), "final": pd.DataFrame(finals)}


def collect(storage, name: str, depths) -> dict[str, pd.DataFrame]:
    parts = [study_tables(storage, name, d) for d in depths]
    return {k: pd.concat([p[k] for p in parts], ignore_index=True) for k in ("trials", "epochs", "final")}


def study_names(storage) -> dict[str, list[int]]:
    """{study name prefix: depths} for every depth study in `storage` (for reports read from storage)."""
    found: dict[str, list[int]] = {}
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        prefix, sep, rest = s.study_name.rpartition("-depth")
        if sep and rest.isdigit():
            found.setdefault(prefix, []).append(int(rest))
    return {k: sorted(v) for k, v in found.items()}


def write_tables(storage, name: str, depths, out: Path) -> dict[str, pd.DataFrame]:
    """trials/epochs/final.csv plus config.json (the study's fixed settings and search space)."""
    out.mkdir(parents=True, exist_ok=True)
    tables = collect(storage, name, depths)
    for key, df in tables.items():
        df.to_csv(out / f"{key}.csv", index=False)
    config = optuna.load_study(study_name=f"{name}-depth{depths[0]}", storage=storage).user_attrs["config"]
    config = {k: v for k, v in config.items() if k != "depth"} | {"depths": list(depths)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tables


def summary(final: pd.DataFrame) -> str:
    """One line per depth: test accuracy mean +- std over seeds, parameters, seconds."""
    lines = []
    for depth, g in final.groupby("depth"):
        acc = g["test_accuracy"]
        lines.append(f"depth {depth}: test accuracy {acc.mean():.4f} +- {acc.std(ddof=1):.4f} (n={len(g)}), "
                     f"widths {g['widths'].iloc[0]}, {g['n_params'].iloc[0]:,} params, "
                     f"lr {g['param_lr'].iloc[0]:.3g}, {g['param_epochs'].iloc[0]} epochs, "
                     f"{g['train_seconds'].mean():.1f} s per run")
    return "\n".join(lines)
