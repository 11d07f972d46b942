"""The factorial design read back from the tables, and the whole uncertainty of a primary contrast.

A factorial cell (config.Matched.band) trains every rate of the band with every seed; each depth's rate is the
band point with the best mean validation accuracy (config.rank_band). `retrained` is final.csv as a study of
one run per cell and seed: each factorial cell at its chosen rate, each tuned cell's best trial (its runners-up
apart). A primary contrast's estimate reads the runs' per-image test predictions (predictions.npz):

- a factorial setting: each depth at its own best rate, the choice made again inside every seed resample
  (stats.chosen), plus the test images' part (stats.crossed);
- any other (the recipe, the tuned depths): the seeds x test-images table of per-image differences
  (stats.crossed), so the test set's sampling is in the interval too.

Without predictions (tables from before them) a contrast falls back to the paired t on per-seed accuracies
(seeds only), and says so.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mnist_bench.errors import UserError

from . import stats
from .config import rank_band

REGENERATE = "regenerate it from the study's storage with python -m study.report --storage URL --out DIR"
CELL = ["experiment", "budget", "shape", "variant", "depth"]


@dataclass(frozen=True)
class Predictions:
    """Each final run's correctness on every test image, keyed by (study, run_trial) as final.csv names runs."""

    correct: dict[tuple[str, int], np.ndarray]  # bool (images,)
    images: int

    @classmethod
    def from_arrays(cls, study, run_trial, predictions, labels) -> Predictions:
        labels = np.asarray(labels)
        correct = {
            (str(s), int(t)): np.asarray(p) == labels for s, t, p in zip(study, run_trial, predictions, strict=True)
        }
        return cls(correct, len(labels))

    def of(self, row) -> np.ndarray | None:
        return self.correct.get((str(row["study"]), int(row["run_trial"])))


def read_predictions(path: Path) -> Predictions | None:
    """predictions.npz as tables.write_tables writes it, None where there is none, or one line saying what is
    wrong with it."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("study", "run_trial", "predictions", "labels")}
        preds, labels = arrays["predictions"], arrays["labels"]
        if preds.ndim != 2 or labels.ndim != 1 or (len(preds) and preds.shape[1] != len(labels)):
            raise ValueError(f"predictions of shape {preds.shape} against {labels.shape} labels")
        if not len(arrays["study"]) == len(arrays["run_trial"]) == len(preds):
            raise ValueError("its arrays name a different number of runs")
        return Predictions.from_arrays(arrays["study"], arrays["run_trial"], preds, labels)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not the predictions file study.depth writes ({first}): {REGENERATE}") from None


def retrained_epochs(epochs: pd.DataFrame, view: pd.DataFrame) -> pd.DataFrame:
    """epochs.csv without the final runs that `view` (retrained(final)) leaves out: a factorial cell's curves at
    its chosen rate, a tuned cell's of its best trial."""
    if "study" not in epochs or "study" not in view or "run_trial" not in view:
        return epochs
    kept = set(zip(view["study"], view["run_trial"]))
    final = epochs["run"] == "final"
    keep = ~final | pd.Series([k in kept for k in zip(epochs["study"], epochs["trial"])], index=epochs.index)
    return epochs[keep]


def _points(final: pd.DataFrame) -> pd.Series:
    return final["band_point"] if "band_point" in final else pd.Series(np.nan, index=final.index)


def val_score(row) -> float:
    """What a run contributes to its rate's choice: its last epoch's validation accuracy, 0 when it diverged
    (as coord.band_choice, which the workers apply)."""
    val = row.get("val_accuracy")
    if bool(row.get("diverged", False)) or val is None or pd.isna(val):
        return 0.0
    return float(val)


def cell_key(values) -> tuple:
    """A cell's CELL values with every missing value as None (a dictionary key that compares equal)."""
    return tuple(None if pd.isna(v) else v for v in values)


def choices(final: pd.DataFrame) -> dict[tuple, int]:
    """The band point each factorial cell of final.csv chose: {cell_key: point}."""
    rows = final[_points(final).notna()]
    scores: dict[tuple, dict[int, list[float]]] = {}
    for _, row in rows.iterrows():
        cell = scores.setdefault(cell_key(row[c] for c in CELL), {})
        cell.setdefault(int(row["band_point"]), []).append(val_score(row))
    return {k: rank_band(v)[0] for k, v in scores.items()}


def retrained(final: pd.DataFrame) -> pd.DataFrame:
    """final.csv with one run per cell and seed: a factorial cell's runs at its chosen rate, a tuned cell's runs of
    its best trial (place 0). Tables from before either are returned as they are."""
    keep = pd.Series(True, index=final.index)
    if "place" in final:
        keep &= final["place"].fillna(0) == 0
    points = _points(final)
    if points.notna().any():
        chosen = choices(final)
        cells = zip(*(final[c] for c in CELL))
        wanted = pd.Series([chosen.get(cell_key(k)) for k in cells], index=final.index, dtype=float)
        keep &= points.isna() | (points == wanted)
    return final[keep]


def band_rows(final: pd.DataFrame, cell: tuple) -> pd.DataFrame:
    """Every run of one factorial cell (its cell_key; all band points)."""
    at = final[_points(final).notna()]
    keys = [cell_key(k) for k in zip(*(at[c] for c in CELL))]
    return at[[k == cell for k in keys]]


def chosen_estimate(a: pd.DataFrame, b: pd.DataFrame, preds: Predictions) -> stats.Chosen:
    """Depth a minus depth b, each at its own best rate, from every run of both factorial cells (`a`, `b`): the
    seeds with every band point of both depths trained and predicted (raises ValueError when fewer than two)."""
    points = sorted(set(a["band_point"].astype(int)) | set(b["band_point"].astype(int)))
    runs = [_runs(g) for g in (a, b)]  # {(band point, seed): its row}, the first where a cell lists one twice
    seeds = [
        int(s)
        for s in sorted(set(a["seed"]) & set(b["seed"]))
        if all((p, s) in r and preds.of(r[(p, s)]) is not None for r in runs for p in points)
    ]
    if len(seeds) < 2:
        raise ValueError(f"{len(seeds)} seed(s) with every rate of both depths predicted: an interval needs 2")

    def arrays(r: dict):
        val = np.array([[val_score(r[(p, s)]) for s in seeds] for p in points])
        test = np.stack([np.stack([preds.of(r[(p, s)]) for s in seeds]) for p in points])
        return val, test

    (val_a, test_a), (val_b, test_b) = (arrays(r) for r in runs)
    return stats.chosen(val_a, val_b, test_a, test_b)


def crossed_estimate(a: pd.DataFrame, b: pd.DataFrame, preds: Predictions) -> stats.Crossed:
    """Depth a minus depth b over the seeds both trained with predictions: the seeds x images table."""
    by_a = {int(r["seed"]): preds.of(r) for _, r in a.iterrows()}
    by_b = {int(r["seed"]): preds.of(r) for _, r in b.iterrows()}
    seeds = sorted(s for s in set(by_a) & set(by_b) if by_a[s] is not None and by_b[s] is not None)
    if len(seeds) < 2:
        raise ValueError(f"{len(seeds)} seed(s) with both depths' predictions: an interval needs 2")
    table = np.stack([by_a[s].astype(np.int8) - by_b[s].astype(np.int8) for s in seeds])
    return stats.crossed(table)


def _runs(g: pd.DataFrame) -> dict:
    out = {}
    for _, row in g.iterrows():
        out.setdefault((int(row["band_point"]), row["seed"]), row)
    return out


def band_runs(final: pd.DataFrame) -> pd.DataFrame:
    """The factorial cells' runs as a learning-rate table (what the learning-rate figure draws): `band_point` a
    whole number, `state` complete, failed or diverged, `retrained` the chosen point's runs, `val_accuracy` the
    last epoch's."""
    rows = final[_points(final).notna() & (final["variant"].fillna("") == "")]
    if rows.empty:
        return pd.DataFrame(columns=[*CELL, "param_lr", "band_point", "seed", "state", "retrained"])
    chosen = choices(rows)
    diverged = rows["diverged"].fillna(False).astype(bool) if "diverged" in rows else False
    failed = rows["failed"].fillna(False).astype(bool) if "failed" in rows else False
    keys = [cell_key(k) for k in zip(*(rows[c] for c in CELL))]
    return rows.assign(
        band_point=rows["band_point"].astype(int),
        state=np.where(diverged, "diverged", np.where(failed, "failed", "complete")),
        retrained=[int(p) == chosen[k] for p, k in zip(rows["band_point"], keys)],
    )


def band_summary(final: pd.DataFrame, band: list[float]) -> pd.DataFrame:
    """Per factorial cell: the chosen rate and its runner-up, the chosen one's lead in mean validation accuracy,
    how many seeds prefer the runner-up, whether the choice sits on the band's edge (the lowest or highest rate:
    the band is then wrong, widen it and rerun that cell), and the mean test accuracy at every band point (in the
    band's declared order: a grown band appends its new rates)."""
    runs = band_runs(final)
    out = []
    for key, g in runs.groupby(CELL, dropna=False, sort=True):
        per = g.pivot_table(index="seed", columns="band_point", values="val_accuracy", aggfunc="first")
        scores = {int(p): [val_score(r) for _, r in rows.iterrows()] for p, rows in g.groupby("band_point")}
        ranked = rank_band(scores)
        best, runner = ranked[0], ranked[1] if len(ranked) > 1 else None
        means = {p: sum(v) / len(v) for p, v in scores.items()}
        test = g.groupby("band_point")["test_accuracy"].mean()
        out.append(
            {
                **dict(zip(CELL, cell_key(key))),
                "chosen": band[best],
                "runner_up": band[runner] if runner is not None else np.nan,
                "lead": means[best] - means[runner] if runner is not None else np.nan,
                "seeds_preferring_runner_up": int((per[runner] > per[best]).sum()) if runner is not None else 0,
                "seeds": len(per),
                "edge": band[best] in (min(band), max(band)),
                **{f"test_{i}": test.get(i, np.nan) for i in range(len(band))},
            }
        )
    return pd.DataFrame(out)


def _tuned_trained(final: pd.DataFrame) -> pd.DataFrame | None:
    """The tuned cells' trained (not failed) final runs of every pick, or None for tables without picks."""
    tuned = final[(final["experiment"] == "tuned") & (final["variant"].fillna("") == "")]
    if "place" not in tuned:
        return None
    return tuned[~tuned["failed"].fillna(False).astype(bool)] if "failed" in tuned else tuned


def search_picks(final: pd.DataFrame, a: int, b: int) -> pd.DataFrame:
    """The tuned contrast a minus b at every pick of each depth's search (place 0 its best trial, 1 and 2 its
    runners-up by validation): the mean per-seed difference over the seeds both picks trained (failed runs left
    out). How much the answer hangs on which near-tied configuration each search happened to rank first."""
    ok = _tuned_trained(final)
    if ok is None:
        return pd.DataFrame(columns=["place_a", "place_b", "n", "diff"])
    rows = []
    for pa, ga in ok[ok["depth"] == a].groupby("place"):
        for pb, gb in ok[ok["depth"] == b].groupby("place"):
            x = ga.set_index("seed")["test_accuracy"]
            y = gb.set_index("seed")["test_accuracy"]
            seeds = sorted(set(x.index) & set(y.index))
            if seeds:
                diff = float((x.loc[seeds] - y.loc[seeds]).mean())
                rows.append({"place_a": int(pa), "place_b": int(pb), "n": len(seeds), "diff": diff})
    return pd.DataFrame(rows, columns=["place_a", "place_b", "n", "diff"])


def with_search(base: stats.Crossed, final: pd.DataFrame, a: int, b: int) -> stats.Crossed | stats.Searched:
    """A tuned contrast's crossed estimate with the search's pick added as a random factor (stats.searched), from
    each depth's best trial and runners-up retrained on common seeds; `base` as it is where a depth has fewer
    than two picks or two common seeds (tables from before runners-up)."""
    ok = _tuned_trained(final)
    if ok is None:
        return base
    tables = []
    for depth in (a, b):
        runs = ok[ok["depth"] == depth].pivot_table(index="place", columns="seed", values="test_accuracy")
        runs = runs.dropna(axis=1)  # the seeds every pick trained
        if runs.shape[0] < 2 or runs.shape[1] < 2:
            return base
        tables.append(runs.to_numpy(float))
    return stats.searched(base, *tables)
