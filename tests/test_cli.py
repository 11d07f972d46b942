"""Every command, every bad input and every signal: one true line, the right exit code, nothing lost
and nothing left behind. The table below is the contract (README: 2 usage, 1 data/storage/environment,
130 interrupted); each row runs the real command in a subprocess."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from conftest import PG_ADMIN_URL, services_required

ROOT = Path(__file__).resolve().parents[1]
DATA_COMMANDS = ["mnist_bench.throughput", "study.depth"]
COMMANDS = [*DATA_COMMANDS, "study.report", "study.scaleout", "study.serve"]
TINY = [
    "--preset",
    "smoke",
    "--experiments",
    "tuned",
    "--depths",
    "2",
    "--n-trials",
    "1",
    "--seeds",
    "1",
    "--train-subset",
    "300",
    "--no-report",
]


def run(*args, cwd=None, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_line(p: subprocess.CompletedProcess, code: int, words: str = ""):
    err = p.stderr.strip()
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(err.splitlines()) == 1, p.stderr
    assert words.lower() in err.lower(), err
    if code in (1, 2):  # one prefix for every error, argparse's usage errors included
        assert err.startswith("error: "), err


# --- the table of bad inputs ---------------------------------------------------------------------


def a_file(tmp: Path, content: bytes = b"not a folder\n") -> Path:
    f = tmp / "a-file"
    f.write_bytes(content)
    return f


def full_sweep(tmp: Path) -> Path:
    """A folder holding the committed full throughput sweep's table."""
    folder = tmp / "sweep"
    folder.mkdir()
    shutil.copy(ROOT / "results" / "throughput.csv", folder / "throughput.csv")
    return folder


def other_study(tmp: Path, name: str = "full", db: bool = False) -> Path:
    """A results folder of another study: its config.json, or (db) only its storage."""
    folder = tmp / "their-results"
    folder.mkdir()
    if db:
        optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name=f"{name}-tuned-depth2")
    else:
        (folder / "config.json").write_text(json.dumps({"name": name, "experiments": {}}))
    return folder


def folder_with(folder: Path, name: str) -> Path:
    """`folder` with a sub-folder where the command writes the file `name`."""
    (folder / name).mkdir(parents=True)
    return folder


def foreign_sqlite(tmp: Path) -> Path:
    import sqlite3

    path = tmp / "other-program.db"
    with sqlite3.connect(path) as con:
        con.execute("create table notes (text)")
    return path


def edited(tmp: Path, table: str, column: str, value) -> Path:
    """Valid synthetic tables with one cell of `table` replaced by `value`."""
    import pandas as pd

    folder = study_tables(tmp)
    df = pd.read_csv(folder / f"{table}.csv")
    df[column] = df[column].astype(object)
    df.loc[df.index[len(df) // 2], column] = value
    df.to_csv(folder / f"{table}.csv", index=False)
    return folder


def seed_twice(tmp: Path) -> Path:
    """final.csv with one run listed twice (the same cell and seed)."""
    folder = study_tables(tmp)
    lines = (folder / "final.csv").read_text().splitlines(keepends=True)
    (folder / "final.csv").write_text("".join([*lines, lines[1]]))
    return folder


def with_config(tmp: Path, config) -> Path:
    folder = study_tables(tmp)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def bad_throughput(tmp: Path) -> Path:
    folder = study_tables(tmp)
    (folder / "throughput.csv").write_text(
        "model,depth,batch_size,pipeline,device,threads,samples_per_s\nmlp,4,64,harness,cpu,1,fast\n"
    )
    return folder


def study_tables(tmp: Path, **replace: str) -> Path:
    """A results folder with valid synthetic tables (test_report's); `replace` swaps a table's bytes."""
    from test_report import CONFIG, write
    from test_report import study_tables as synthetic

    folder = tmp / "results"
    folder.mkdir()
    means = {1: 0.92, 2: 0.96, 3: 0.97, 4: 0.98, 5: 0.975, 6: 0.96}
    write(folder, *synthetic(means, means, {3: 0.97, 4: 0.98, 5: 0.975}), CONFIG)
    for name, text in replace.items():
        (folder / f"{name}.csv").write_bytes(text.encode("latin-1"))
    return folder


def storage_with(tmp: Path, final: bool, name: str = "s.db") -> str:
    """An SQLite storage holding a tuning study with one finished trial; its final study only if `final`."""
    url = f"sqlite:///{tmp / name}"
    from study.config import PRESETS, Cell

    config = PRESETS["smoke"].identity(Cell("tuned", 2))
    tune = optuna.create_study(storage=url, study_name="smoke-tuned-depth2", direction="maximize")
    tune.set_user_attr("config", config)
    tune.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.1, "epochs": 1, "width": 16},
            distributions={
                "lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True),
                "epochs": optuna.distributions.IntDistribution(1, 4),
                "width": optuna.distributions.IntDistribution(16, 256, log=True),
            },
            value=0.9,
            user_attrs={"curve": [[1, 1.0, 1.0, 0.9, 1.0]], "diverged": False},
        )
    )
    if final:
        optuna.create_study(storage=url, study_name="smoke-tuned-depth2-final", direction="maximize")
    return url


def grid_design_storage(tmp: Path) -> str:
    """A storage of the smoke study as the grid design stored it: a matched cell's settings without a band (a grid of
    learning rates and its rule instead), beside a tuned cell of the settings this version has."""
    from study.config import PRESETS, Cell

    url = storage_with(tmp, final=True, name="grid.db")
    config = PRESETS["smoke"].identity(Cell("matched", 4, 242_762))
    grid = {k: v for k, v in config["experiment"].items() if k != "band"}
    config["experiment"] = {**grid, "lr": [0.0178, 0.316], "lr_points": 3, "replicates": 2, "lr_rule": "smoothed"}
    for suffix in ("", "-final"):
        study = optuna.create_study(
            storage=url, study_name=f"smoke-matched-params242762-depth4{suffix}", direction="maximize"
        )
        study.set_user_attr("config", config)
    return url


def grid_design_results(tmp: Path) -> Path:
    """A results folder whose config.json is the grid design's: a matched experiment without a band."""
    from test_report import CONFIG

    matched = {k: v for k, v in CONFIG["experiments"]["matched"].items() if k != "band"}
    return with_config(tmp, {**CONFIG, "experiments": {**CONFIG["experiments"], "matched": matched}})


def two_studies(tmp: Path) -> str:
    """A storage holding two depth studies, 'smoke' and 'other'."""
    url = storage_with(tmp, final=True)
    optuna.create_study(storage=url, study_name="other-tuned-depth2", direction="maximize")
    return url


def not_a_database(tmp: Path) -> Path:
    path = tmp / "notes.txt"
    path.write_text("a text file, not a storage\n")
    return path


def damaged_storage(tmp: Path) -> str:
    url = storage_with(tmp, final=True, name="damaged.db")
    path = tmp / "damaged.db"
    raw = bytearray(path.read_bytes())
    for page in range(2, len(raw) // 4096):
        raw[4096 * page : 4096 * page + 200] = b"\xab" * 200
    path.write_bytes(bytes(raw))
    return url


@dataclass
class Case:
    command: str
    args: object  # list[str], or a function of the test's tmp folder returning one
    code: int
    words: str
    env: dict = field(default_factory=dict)
    untouched: bool = True  # a file handed in as --out is left as it was

    def argv(self, tmp: Path) -> list[str]:
        return self.args(tmp) if callable(self.args) else list(self.args)


CASES = {
    # Output folders: checked before any work, on every command that writes.
    "depth-out-is-a-file": Case("study.depth", lambda t: [*TINY, "--out", str(a_file(t))], 2, "is a file"),
    "depth-out-under-proc": Case("study.depth", [*TINY, "--out", "/proc/mnist-bench"], 2, "cannot write"),
    "depth-out-read-only": Case("study.depth", [*TINY, "--out", "/sys/mnist-bench"], 2, "cannot write"),
    "depth-storage-url-with-bad-out": Case(
        "study.depth", lambda t: [*TINY, "--storage", f"sqlite:///{t / 'ok.db'}", "--out", "/proc/x"], 2, "cannot write"
    ),
    "report-out-is-a-file": Case(
        "study.report", lambda t: ["--results", str(study_tables(t)), "--out", str(a_file(t))], 2, "is a file"
    ),
    "report-storage-out-under-proc": Case(
        "study.report", lambda t: ["--storage", storage_with(t, True), "--out", "/proc/x"], 2, "cannot write"
    ),
    "throughput-empty-name": Case("mnist_bench.throughput", ["--name", ""], 2, "plain file name"),
    "throughput-name-with-folder": Case("mnist_bench.throughput", ["--name", "a/b.csv"], 2, "plain file name"),
    "throughput-out-is-a-file": Case("mnist_bench.throughput", lambda t: ["--out", str(a_file(t))], 2, "is a file"),
    "scaleout-out-is-a-file": Case("study.scaleout", lambda t: ["--out", str(a_file(t))], 2, "is a file"),
    # Datasets: only the two pinned ones, and a file of one is not accepted as the other.
    "depth-unknown-dataset": Case("study.depth", [*TINY, "--dataset", "cifar10"], 2, "--dataset"),
    "depth-margin-negative": Case("study.depth", [*TINY, "--margin", "-0.2"], 2, "--margin"),
    "report-margin-nan": Case(
        "study.report", lambda t: ["--results", str(study_tables(t)), "--margin", "nan"], 2, "(0, 10] points"
    ),
    "depth-fashion-files-as-mnist": Case(
        "study.depth",
        lambda t: [*TINY, "--data-dir", str(ROOT / "data" / "fashion-mnist"), "--out", str(t / "o")],
        1,
        "is the fashion-mnist file, not mnist's",
    ),
    "throughput-mnist-files-as-fashion": Case(
        "mnist_bench.throughput",
        ["--dataset", "fashion-mnist", "--data-dir", str(ROOT / "data" / "mnist")],
        1,
        "is the mnist file",
    ),
    # Devices: only what the machine has.
    "depth-device-meta": Case("study.depth", [*TINY, "--device", "meta"], 2, "auto, cpu, cuda"),
    "depth-device-mps": Case("study.depth", [*TINY, "--device", "mps"], 2, "auto, cpu, cuda"),
    "throughput-device-mps": Case("mnist_bench.throughput", ["--device", "mps"], 2, "auto, cpu, cuda"),
    # Report inputs.
    "report-no-such-folder": Case("study.report", ["--results", "/nonexistent/results"], 2, "not a folder"),
    "report-zero-byte-trials": Case(
        "study.report", lambda t: ["--results", str(study_tables(t, trials=""))], 1, "empty (0 bytes)"
    ),
    "report-garbled-final": Case(
        "study.report",
        lambda t: ["--results", str(study_tables(t, final='depth,seed\n1,2,3,4\n"unterminated\xff\n'))],
        1,
        "final.csv",
    ),
    "report-final-without-columns": Case(
        "study.report", lambda t: ["--results", str(study_tables(t, final="a,b\n1,2\n"))], 1, "no column"
    ),
    "report-mistyped-sqlite-storage": Case(
        "study.report",
        lambda t: ["--storage", f"sqlite:///{t / 'typo.db'}", "--out", str(t / "r")],
        1,
        "no storage file",
    ),
    "report-final-study-missing": Case(
        "study.report", lambda t: ["--storage", storage_with(t, False), "--out", str(t / "r")], 1, "has no study"
    ),
    "report-final-study-empty": Case(
        "study.report", lambda t: ["--storage", storage_with(t, True), "--out", str(t / "r")], 1, "no retrained runs"
    ),
    # Storage files.
    "report-two-studies-none-named": Case(
        "study.report", lambda t: ["--storage", two_studies(t), "--out", str(t / "r")], 2, "pick one with --study-name"
    ),
    "report-study-name-not-there": Case(
        "study.report",
        lambda t: ["--storage", two_studies(t), "--study-name", "nope", "--out", str(t / "r")],
        2,
        "no study named 'nope'",
    ),
    "report-damaged-storage": Case(
        "study.report", lambda t: ["--storage", damaged_storage(t), "--out", str(t / "r")], 1, "is damaged"
    ),
    "report-storage-not-a-database": Case(
        "study.report",
        lambda t: ["--storage", f"sqlite:///{not_a_database(t)}", "--out", str(t / "r")],
        1,
        "is not an SQLite database file",
    ),
    "depth-storage-not-a-database": Case(
        "study.depth",
        lambda t: [*TINY, "--storage", f"sqlite:///{not_a_database(t)}", "--out", str(t / "o")],
        1,
        "is not an SQLite database file",
    ),
    "depth-damaged-storage": Case(
        "study.depth", lambda t: [*TINY, "--storage", damaged_storage(t), "--out", str(t / "o")], 1, "is damaged"
    ),
    # Limits.
    "depth-huge-seeds": Case("study.depth", [*TINY, "--seeds", "1000000000"], 2, "1..1000"),
    "depth-huge-n-trials": Case("study.depth", [*TINY, "--n-trials", "1000000000"], 2, "1..10000"),
    "depth-huge-heartbeat": Case("study.depth", [*TINY, "--heartbeat", "10000000000"], 2, "1..3600"),
    "depth-huge-train-subset": Case(
        "study.depth", lambda t: [*TINY, "--train-subset", "1000000000000", "--out", str(t / "o")], 2, "1..58000"
    ),
    "depth-repeated-depths": Case("study.depth", [*TINY, "--depths", "2", "2"], 2, "distinct"),
    "depth-depth-too-large": Case("study.depth", [*TINY, "--depths", "99"], 2, "1..8"),
    "depth-empty-study-name": Case("study.depth", [*TINY, "--study-name", ""], 2, "study-name"),
    "depth-threads-zero": Case("study.depth", [*TINY, "--threads", "0"], 2, "threads"),
    "depth-workers-huge": Case("study.depth", [*TINY, "--workers", "100000"], 2, "1..256"),
    "depth-unknown-storage-scheme": Case(
        "study.depth", lambda t: [*TINY, "--storage", "nosuchdb://x", "--out", str(t / "o")], 1, "cannot open"
    ),
    "depth-grpc-without-port": Case(
        "study.depth", lambda t: [*TINY, "--storage", "grpc://host-only", "--out", str(t / "o")], 2, "grpc://HOST:PORT"
    ),
    "serve-without-storage": Case("study.serve", [], 2, "--storage"),
    "serve-port-too-large": Case("study.serve", ["--storage", "sqlite:///x.db", "--port", "70000"], 2, "1..65535"),
    "serve-a-proxy": Case("study.serve", ["--storage", "grpc://127.0.0.1:1"], 2, "does not serve another proxy"),
    "serve-unknown-scheme": Case("study.serve", ["--storage", "nosuchdb://x"], 1, "cannot open"),
    "serve-in-memory": Case("study.serve", ["--storage", "sqlite:///:memory:"], 2, "keep nothing"),
    "depth-bare-host-port-storage": Case(
        "study.depth", lambda t: [*TINY, "--storage", "127.0.0.1:13000", "--out", str(t / "o")], 1, "grpc://HOST:PORT"
    ),
    "scaleout-kill-test-negative-kills": Case("study.scaleout", ["--kill-test", "--kills", "-1"], 2, "0..1000"),
    "throughput-threads-zero": Case("mnist_bench.throughput", ["--threads", "0"], 2, "threads"),
    "scaleout-depth-99": Case("study.scaleout", ["--depth", "99"], 2, "1..8"),
    "scaleout-bogus-pg-url": Case(
        "study.scaleout",
        lambda t: ["--out", str(t / "o")],
        2,
        "postgresql://",
        env={"MNIST_BENCH_PG_URL": "bogus://nowhere"},
    ),
    "scaleout-sqlite-pg-url": Case(
        "study.scaleout",
        lambda t: ["--out", str(t / "o")],
        2,
        "postgresql://",
        env={"MNIST_BENCH_PG_URL": "sqlite:///x.db"},
    ),
    # Another study's results are never written over (a quick run into the committed results/).
    "throughput-quick-over-a-full-sweep": Case(
        "mnist_bench.throughput", lambda t: ["--quick", "--out", str(full_sweep(t))], 2, "holds a full sweep"
    ),
    "throughput-packs-over-a-full-sweep": Case(
        "mnist_bench.throughput", lambda t: ["--only-packs", "--out", str(full_sweep(t))], 2, "never replaces it"
    ),
    "depth-over-another-studys-tables": Case(
        "study.depth", lambda t: [*TINY, "--out", str(other_study(t))], 2, "holds the tables of study 'full'"
    ),
    "depth-into-another-studys-storage": Case(
        "study.depth", lambda t: [*TINY, "--out", str(other_study(t, db=True))], 2, "holds study 'full'"
    ),
    "report-over-another-studys-report": Case(
        "study.report",
        lambda t: ["--results", str(study_tables(t)), "--out", str(other_study(t, name="else"))],
        2,
        "holds the tables of study 'else'",
    ),
    "report-storage-over-another-studys-tables": Case(
        "study.report",
        lambda t: ["--storage", storage_with(t, True), "--out", str(other_study(t))],
        2,
        "holds the tables of study 'full'",
    ),
    # Names that name nothing.
    "depth-recipe-depth-beyond-funnel": Case(
        "study.depth", [*TINY[:2], "--experiments", "recipe", "--depths", "6", "7", "--no-report"], 2, "recipe's funnel"
    ),
    "depth-empty-out": Case("study.depth", [*TINY, "--out", ""], 2, "must be a path"),
    "depth-empty-data-dir": Case("study.depth", [*TINY, "--data-dir", ""], 2, "must be a path"),
    "throughput-repeated-threads": Case("mnist_bench.throughput", ["--threads", "1", "1"], 2, "distinct"),
    "throughput-300-character-name": Case("mnist_bench.throughput", ["--name", "x" * 300], 2, "255 bytes"),
    # Every output proven replaceable before the work.
    "depth-folder-named-final-csv": Case(
        "study.depth", lambda t: [*TINY, "--out", str(folder_with(t, "final.csv"))], 2, "is a folder"
    ),
    "depth-folder-named-report-md": Case(
        "study.depth",
        lambda t: [*TINY[:-1], "--out", str(folder_with(t, "report.md"))],
        2,
        "is a folder",
    ),
    "report-folder-named-matched-png": Case(
        "study.report", lambda t: ["--results", str(folder_with(study_tables(t), "matched.png"))], 2, "is a folder"
    ),
    "throughput-table-is-a-folder": Case(
        "mnist_bench.throughput", lambda t: ["--out", str(folder_with(t, "throughput.csv"))], 2, "is a folder"
    ),
    # Storage URLs and paths.
    "depth-out-with-question-mark": Case("study.depth", lambda t: [*TINY, "--out", str(t / "a?b")], 2, "'?'"),
    "depth-out-with-percent": Case("study.depth", lambda t: [*TINY, "--out", str(t / "a%41")], 2, "'%'"),
    "depth-storage-in-memory": Case("study.depth", [*TINY, "--storage", "sqlite:///:memory:"], 2, "in-memory"),
    "depth-storage-sqlite-nothing": Case("study.depth", [*TINY, "--storage", "sqlite:///"], 2, "in-memory"),
    "depth-storage-missing-folder": Case(
        "study.depth",
        lambda t: [*TINY, "--storage", f"sqlite:///{t / 'no' / 'such' / 's.db'}", "--out", str(t / "o")],
        1,
        "no folder",
    ),
    "report-storage-zero-byte-file": Case(
        "study.report",
        lambda t: ["--storage", f"sqlite:///{a_file(t, b'')}", "--out", str(t / "r")],
        1,
        "not an Optuna storage",
    ),
    "report-storage-another-programs-sqlite": Case(
        "study.report",
        lambda t: ["--storage", f"sqlite:///{foreign_sqlite(t)}", "--out", str(t / "r")],
        1,
        "not an Optuna storage",
    ),
    # Tables are read for what they hold, not only for their column names.
    "report-non-numeric-accuracy": Case(
        "study.report", lambda t: ["--results", str(edited(t, "final", "test_accuracy", "abc"))], 1, "'test_accuracy'"
    ),
    "report-accuracy-above-1": Case(
        "study.report", lambda t: ["--results", str(edited(t, "final", "test_accuracy", 5.0))], 1, "accuracy in [0, 1]"
    ),
    "report-non-numeric-depth": Case(
        "study.report", lambda t: ["--results", str(edited(t, "final", "depth", "four"))], 1, "column 'depth'"
    ),
    "report-empty-n-params": Case(
        "study.report", lambda t: ["--results", str(edited(t, "final", "n_params", None))], 1, "column 'n_params'"
    ),
    "report-non-numeric-epoch": Case(
        "study.report", lambda t: ["--results", str(edited(t, "epochs", "epoch", "x"))], 1, "column 'epoch'"
    ),
    "report-non-numeric-flops": Case(
        "study.report", lambda t: ["--results", str(edited(t, "trials", "train_flops", "lots"))], 1, "'train_flops'"
    ),
    "report-non-numeric-val-accuracy": Case(
        "study.report", lambda t: ["--results", str(edited(t, "trials", "val_accuracy", "n/a?"))], 1, "'val_accuracy'"
    ),
    "report-depth-beyond-any-study": Case(
        "study.report", lambda t: ["--results", str(edited(t, "final", "depth", 99))], 1, "a depth in 1..8"
    ),
    "report-unknown-experiment": Case(
        "study.report", lambda t: ["--results", str(edited(t, "final", "experiment", "bogus"))], 1, "one of recipe"
    ),
    "report-unknown-trial-state": Case(
        "study.report", lambda t: ["--results", str(edited(t, "trials", "state", "weird"))], 1, "a trial state"
    ),
    "report-a-seed-twice": Case(
        "study.report", lambda t: ["--results", str(seed_twice(t))], 1, "same cell, configuration and seed"
    ),
    "report-results-and-storage": Case(
        "study.report", lambda t: ["--results", str(study_tables(t)), "--storage", storage_with(t, True)], 2, "not both"
    ),
    "report-config-is-a-list": Case(
        "study.report", lambda t: ["--results", str(with_config(t, []))], 1, "not a study's config.json"
    ),
    "report-config-unknown-dataset": Case(
        "study.report", lambda t: ["--results", str(with_config(t, {"dataset": "cifar10"}))], 1, "unknown dataset"
    ),
    "report-config-null-dataset": Case(
        "study.report", lambda t: ["--results", str(with_config(t, {"dataset": None}))], 1, "unknown dataset"
    ),
    # A study of the grid design (before the factorial): neither resumed nor reported, in one line.
    "depth-grid-design-storage": Case(
        "study.depth", lambda t: [*TINY, "--storage", grid_design_storage(t), "--out", str(t / "o")], 2, "grid design"
    ),
    "report-grid-design-storage": Case(
        "study.report", lambda t: ["--storage", grid_design_storage(t), "--out", str(t / "r")], 2, "commit 88d9cef"
    ),
    "report-grid-design-results": Case(
        "study.report", lambda t: ["--results", str(grid_design_results(t))], 2, "no longer runs or reports"
    ),
    "report-non-numeric-throughput": Case(
        "study.report", lambda t: ["--results", str(bad_throughput(t))], 1, "'samples_per_s'"
    ),
    "scaleout-unreachable-pg": Case(
        "study.scaleout",
        lambda t: ["--out", str(t / "o")],
        1,
        "not reachable",
        env={"MNIST_BENCH_PG_URL": "postgresql://nobody@127.0.0.1:1/none"},
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_with_the_right_exit_code(name: str, tmp_path: Path):
    case = CASES[name]
    argv = case.argv(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    folders = {p for p in tmp_path.rglob("*") if p.is_dir()}
    p = run(case.command, *argv, env=case.env)
    assert_one_line(p, case.code, case.words)
    for path, content in before.items():  # nothing handed in was changed
        assert path.read_bytes() == content, path
    empty = {p for p in tmp_path.rglob("*") if p.is_dir() and not any(p.iterdir())} - folders
    assert not empty, f"left behind: {sorted(map(str, empty))}"  # no empty --out folder (tables written are kept)
    assert not (tmp_path / "typo.db").exists()
    assert "study '" not in p.stdout  # study.depth: refused before any training


# --- signals -------------------------------------------------------------------------------------


def ours(tmp: Path) -> list[Path]:
    """What is left in a TMPDIR, except PyTorch's own compile cache (torchinductor_<user>)."""
    return [p for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_for_line(proc: subprocess.Popen, words: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if words in line:
            return
        if not line and proc.poll() is not None:
            break
    pytest.fail(f"never saw {words!r} (exit {proc.poll()}): {proc.stderr.read()}")


def handles(proc: subprocess.Popen, sig: int, timeout: float = 300) -> None:
    """Wait until `proc` catches `sig` (its SigCgt mask in /proc): past interpreter start-up, where a signal
    would still kill it outright. Structural, so a loaded machine only makes the wait longer."""
    status = Path(f"/proc/{proc.pid}/status")
    if not status.exists():
        pytest.skip("no /proc to see the signal handlers")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        caught = next((line.split()[1] for line in status.read_text().splitlines() if line.startswith("SigCgt:")), "0")
        if int(caught, 16) & (1 << (sig - 1)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the command never installed its {signal.Signals(sig).name} handler")


def stopped(proc: subprocess.Popen, sig: int = signal.SIGTERM, again: bool = False) -> tuple[int, str]:
    proc.send_signal(sig)
    if again:
        time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return proc.returncode, err.strip()


def test_sigterm_to_a_lone_worker_keeps_what_finished(tmp_path: Path):
    out = tmp_path / "out"
    proc = start(
        "study.depth",
        "--preset",
        "smoke",
        "--experiments",
        "recipe",
        "--depths",
        "4",
        "--seeds",
        "30",
        "--train-subset",
        "5000",
        "--out",
        str(out),
    )
    import sqlite3

    def states() -> list[str]:
        try:
            with sqlite3.connect(out / "study.db") as con:
                return [r[0] for r in con.execute("select state from trials")]
        except sqlite3.Error:
            return []

    deadline = time.time() + 120
    while "COMPLETE" not in states() and time.time() < deadline:
        time.sleep(0.1)  # a run finished, the next one in flight
    code, err = stopped(proc)
    assert code == 130 and ("everything finished is in" in err or "recorded as failed" in err)
    assert "RUNNING" not in states() and "COMPLETE" in states()


def test_sigterm_to_throughput_removes_its_temporary_folder(tmp_path: Path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = start(
        "mnist_bench.throughput",
        "--quick",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "out"),
        env={"TMPDIR": str(tmp)},
    )
    wait_for_line(proc, "matmul peak")
    code, err = stopped(proc)
    assert code == 130 and "temporary files removed" in err, (code, err)
    assert ours(tmp) == [] and not (tmp_path / "out").exists()  # nothing written, so no empty folder either


def test_sigterm_to_report_leaves_no_half_report(tmp_path: Path):
    folder = study_tables(tmp_path)
    proc = start("study.report", "--results", str(folder))
    handles(proc, signal.SIGTERM)  # in the imports or in the plots: either way one line and 130
    if proc.poll() == 0:
        pytest.skip("the report finished before the signal")
    code, err = stopped(proc)
    assert code == 130 and err.startswith("interrupted")
    assert not any(p.name.endswith(".partial") for p in folder.iterdir())


def test_ctrl_c_twice_during_start_up_is_one_line(tmp_path: Path):
    proc = start("study.depth", *TINY, "--out", str(tmp_path / "o"))
    # Python catches SIGINT from its first instant; SIGTERM only once cli.starting has run: past interpreter
    # start-up, still loading PyTorch or the data.
    handles(proc, signal.SIGTERM)
    code, err = stopped(proc, signal.SIGINT, again=True)
    assert code == 130 and err.startswith("interrupted")


def test_sigterm_to_scaleout_stops_its_workers_and_drops_its_databases(tmp_path: Path):
    import sqlalchemy

    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as con:
            con.execute(sqlalchemy.text("select 1"))
    except Exception as e:  # noqa: BLE001
        if services_required():
            pytest.fail(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {e}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = start("study.scaleout", "--n-trials", "200", "--out", str(tmp_path / "out"), env={"TMPDIR": str(tmp)})

    def scaleout_dbs() -> set[str]:  # this command's databases only: another copy of the suite may run its own
        with admin.connect() as con:
            rows = con.execute(sqlalchemy.text("select datname from pg_database")).fetchall()
        return {r[0] for r in rows if r[0].startswith(f"mnist_bench_scaleout_{proc.pid}_")}

    before = scaleout_dbs()
    assert before == set()
    deadline = time.time() + 60
    while scaleout_dbs() == before and time.time() < deadline:
        time.sleep(0.2)
    assert scaleout_dbs(), "the command made no database of its own"
    time.sleep(3)  # the worker is training
    code, err = stopped(proc)
    assert code == 130 and "workers stopped" in err
    assert scaleout_dbs() == before and ours(tmp) == []
    assert not (tmp_path / "out" / "scaleout.csv").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp) not in ps  # no worker left running
    admin.dispose()


# --- what every command shares ---------------------------------------------------------------------


@pytest.mark.parametrize("module", COMMANDS)
def test_help(module):
    p = run(module, "--help")
    assert p.returncode == 0 and "usage:" in p.stdout
    assert ("--storage" if module == "study.serve" else "--out") in p.stdout  # the proxy writes no files


@pytest.mark.parametrize("module", COMMANDS)
@pytest.mark.parametrize("bad", [["--threads", "-1"], ["--no-such-flag"]])
def test_bad_argument_exits_2_without_traceback(module, bad):
    assert_one_line(run(module, *bad), 2)


@pytest.mark.parametrize("module", DATA_COMMANDS)
def test_corrupted_data_fails_fast_with_one_line(module, data_copy: Path, tmp_path: Path):
    path = data_copy / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    p = run(module, "--data-dir", str(data_copy), "--out", str(tmp_path / "out"))
    assert_one_line(p, 1, "t10k-labels-idx1-ubyte")
    assert not (tmp_path / "out").exists()


def test_cuda_without_cuda_is_a_usage_error(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_one_line(run("study.depth", *TINY, "--device", "cuda", "--out", str(tmp_path)), 2, "CUDA")


def test_throughput_quick_writes_documented_columns(tmp_path: Path, monkeypatch):
    from mnist_bench import throughput

    # Structural check on a reduced grid (the real sweep is `python -m mnist_bench.throughput`).
    monkeypatch.setattr(throughput, "BATCH_SIZES", (64, 256))
    monkeypatch.setattr(throughput, "DEPTHS", (1, 4))
    tiny = throughput.Timing(warmup_seconds=0.01, min_seconds=0.01, repeats=2)
    df = throughput.sweep([throughput.torch.device("cpu")], [1], tiny, None, packs=(1, 3), log=lambda s: None)
    assert {
        "pipeline",
        "model",
        "depth",
        "batch_size",
        "device",
        "threads",
        "samples_per_s",
        "ms_per_step",
        "gflops",
        "peak_gflops",
        "torch_version",
        "cpu",
        "gpu",
    } <= set(df.columns)
    assert set(df.pipeline) == {"harness", "source-dataloader", "pack"}
    assert len(df[df.pipeline == "harness"]) == 2 * 2  # the grid
    packs = df[df.pipeline == "pack"]
    assert sorted(zip(packs["pack"], packs["batch_order"])) == [(1, "separate"), (3, "separate"), (3, "shared")]
    assert (df.samples_per_s > 0).all() and (df.peak_gflops > 0).all() and (packs.speedup > 0).all()
    assert "harness / source" in throughput.summary(df) and "K=3 shared" in throughput.summary(df)


def test_throughput_keeps_its_measurements_when_the_table_cannot_be_written(tmp_path: Path, monkeypatch):
    import pandas as pd

    from mnist_bench import throughput
    from mnist_bench.errors import UserError

    measured = pd.DataFrame({"model": ["mlp4"], "samples_per_s": [123.0]})
    monkeypatch.setattr(throughput, "load_mnist", lambda *a, **k: None)
    monkeypatch.setattr(throughput, "sweep", lambda *a, **k: measured)
    monkeypatch.setattr(throughput, "summary", lambda df: "")
    name = "x" * 250 + ".csv"  # 254 bytes: the name fits, and so must whatever is written on the way
    args = ["--device", "cpu", "--threads", "1", "--name", name, "--out", str(tmp_path)]
    written = measured.assign(sweep="full")[["sweep", "model", "samples_per_s"]]
    assert throughput.main(args) == 0 and pd.read_csv(tmp_path / name).equals(written)

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(throughput.os, "replace", full)
    with pytest.raises(UserError, match=r"No space left on device\); the measurements are in ") as e:
        throughput.main(args)
    kept = Path(str(e.value).rsplit("the measurements are in ", 1)[1])
    assert pd.read_csv(kept).equals(written) and [p.name for p in tmp_path.iterdir()] == [name]
    kept.unlink()


def test_the_table_covers_every_command():
    assert {c.command for c in CASES.values()} == set(COMMANDS)
    json.dumps({k: v.code for k, v in CASES.items()})  # the counts the closing note gives


@pytest.mark.parametrize(
    "text, shown",
    [
        ("postgresql://postgres:SECRET@127.0.0.1:5432/db", "postgresql://postgres:***@127.0.0.1:5432/db"),
        ("postgresql+psycopg://u:p%40ss@h/db?sslmode=require", "postgresql+psycopg://u:***@h/db?sslmode=require"),
        (
            "postgresql://u@h/db?password=SECRET&application_name=x",
            "postgresql://u@h/db?password=***&application_name=x",
        ),
        ("--storage mysql+pymysql://root:pw@h/test --out X", "--storage mysql+pymysql://root:***@h/test --out X"),
        ("host=h password=SECRET dbname=x", "host=h password=*** dbname=x"),
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
        ("grpc://proxy:13000", "grpc://proxy:13000"),
        ("mysql://root:@localhost/test", "mysql://root:@localhost/test"),  # no password: nothing to mask
    ],
)
def test_a_password_is_masked_as_sqlalchemy_masks_it(text, shown):
    import sqlalchemy

    from mnist_bench.redact import redact

    assert redact(text) == shown
    if text.startswith("postgresql") and "password=" not in text:  # SQLAlchemy's own masking agrees
        assert shown == sqlalchemy.make_url(text).render_as_string(hide_password=True)
