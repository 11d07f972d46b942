"""A results folder whose files do not fit together, or hold a value of the wrong kind or size, is refused in
one true line (exit 1), never rendered into a wrong report or a traceback; tables are written whole or not at
all; text files are UTF-8 whatever the locale. Each case is one edit of a copy of the committed MNIST study's
folder (results/: a finished full study), as a fuzzer made them."""

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from mnist_bench import cli, files
from mnist_bench.errors import UsageError, UserError
from study import report, tables
from study.config import Cell, refuse_other_study
from study.results import load_results, read_config, read_throughput

ROOT = Path(__file__).resolve().parents[1]
FILES = ("trials.csv", "epochs.csv", "final.csv", "superseded.csv", "config.json", "throughput.csv")
COMMITTED = ("results", "results/fashion-mnist")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The committed study's tables, config.json and throughput.csv, copied once per module."""
    folder = tmp_path_factory.mktemp("finished")
    for name in FILES:
        shutil.copy(ROOT / "results" / name, folder / name)
    return folder


@pytest.fixture
def results(finished: Path, tmp_path: Path) -> Path:
    """A writable copy of the finished folder for one test's edit."""
    return Path(shutil.copytree(finished, tmp_path / "results"))


def table(folder: Path, name: str) -> pd.DataFrame:
    """A table as its text, cell by cell, so writing it back changes only what a test edits."""
    return pd.read_csv(folder / f"{name}.csv", dtype=str, keep_default_na=False)


def put(folder: Path, name: str, df: pd.DataFrame) -> None:
    df.to_csv(folder / f"{name}.csv", index=False)


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    change(config)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def refused(folder: Path, *words: str) -> str:
    """`python -m study.report --results folder` refuses in one line (exit 1) holding `words`."""
    with pytest.raises(UserError) as e:
        report.main(["--results", str(folder)])
    message = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in message, message
    for w in words:
        assert w in message, message
    return message


def of_cell(df: pd.DataFrame, experiment: str, depth: int, budget: str = "", variant: str = "") -> pd.Series:
    return (
        (df.experiment == experiment)
        & (df.depth == str(depth))
        & (df.budget == budget)
        & (df["shape"] == "funnel")
        & (df.variant == variant)
    )


# --- the committed folders are what the checks must accept ------------------------------------------------


@pytest.mark.parametrize("folder", COMMITTED)
def test_every_committed_results_folder_passes_every_check(folder: str):
    trials, epochs, final, config = load_results(ROOT / folder)
    assert len(final) > 200 and len(trials) > 50 and config["experiments"]
    assert read_throughput(ROOT / "results" / "throughput.csv") is not None


# --- 1, 7: config.json against the tables: every part not in progress is there whole ---------------------


@pytest.mark.parametrize("cut", ["60 lines", "recipe rows only"])
def test_a_cut_final_table_is_refused_naming_the_cell_and_the_runs_missing(results: Path, cut: str):
    if cut == "60 lines":
        lines = (results / "final.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        (results / "final.csv").write_text("".join(lines[:60]), encoding="utf-8")
        refused(results, "final.csv has 0 of the 10 final runs of recipe-depth1 (10 missing)", "declares finished")
    else:
        final = table(results, "final")
        put(results, "final", final[final.experiment == "recipe"])
        refused(results, "final.csv has 0 of the 30 final runs of matched-depth1 (30 missing)", "config.json")


def test_runs_config_json_lists_in_progress_may_be_missing_and_no_others(results: Path):
    """Three of tuned depth 4's six seeds cut from final.csv and epochs.csv alike: refused as missing while
    config.json declares the cell finished, accepted once it lists them in progress (as a study still running
    writes it), refused again where its count of done runs is not the table's."""
    final, epochs = table(results, "final"), table(results, "epochs")
    late = lambda df: of_cell(df, "tuned", 4) & pd.to_numeric(df.seed).isin([4, 5, 6])  # noqa: E731 (the best's only)
    put(results, "final", final[~late(final)])
    put(results, "epochs", epochs[~(late(epochs) & (epochs.run == "final"))])
    refused(results, "has 9 of the 12 final runs of tuned-depth4 (3 missing)")  # its best 6 seeds, runners-up 3 each
    entry = {"cell": "tuned-depth4", "what": "final runs", "done": 9, "budget": 12}
    edit_config(results, lambda c: c.__setitem__("in_progress", [entry]))
    assert len(load_results(results)[2]) == len(final) - 3
    edit_config(results, lambda c: c.__setitem__("in_progress", [{**entry, "done": 10}]))
    refused(results, "has 9 final runs of tuned-depth4, where config.json records 10 of 12 done")


def test_a_header_only_trials_table_is_refused_where_config_json_declares_tuning(results: Path):
    (results / "trials.csv").write_text(
        (results / "trials.csv").read_text(encoding="utf-8").splitlines(keepends=True)[0], encoding="utf-8"
    )
    refused(results, "trials.csv has 0 of the 24 tuning trials of tuned-depth3", "declares finished")


# --- 2: the tables against each other --------------------------------------------------------------------


def test_a_depth_in_final_but_not_in_epochs_is_refused(results: Path):
    epochs = table(results, "epochs")
    put(results, "epochs", epochs[epochs.depth != "4"])
    refused(results, "epochs.csv has 0 of the 10 epochs of the final run of matched-params60000-depth4, seed 1")


def test_an_accuracy_that_is_not_its_count_over_the_test_images_is_refused(results: Path):
    final = pd.read_csv(results / "final.csv")
    final["test_correct"] = (final.test_accuracy * 10_000).round().astype(int)
    final["test_images"] = 10_000
    final.to_csv(results / "final.csv", index=False)
    load_results(results)  # counts that fit: read, and the accuracy the analysis uses is the count's
    final.loc[3, "test_accuracy"] += 0.0001
    final.to_csv(results / "final.csv", index=False)
    refused(results, "final.csv row 5: test_accuracy", "is not test_correct / test_images")
    final.loc[3, "test_correct"] = 10_001
    final.to_csv(results / "final.csv", index=False)
    refused(results, "final.csv row 5: more correct test images than test images")


def test_a_run_whose_failure_its_own_row_contradicts_is_refused(results: Path):
    # From a new user's trial: an accuracy of nan on a row that says it neither diverged nor failed was counted
    # as a failed run without a word.
    original = table(results, "final")
    final = original.copy()
    final.loc[2, "test_accuracy"] = "nan"
    put(results, "final", final)
    refused(results, "final.csv row 4: no test accuracy on a run that did not diverge")
    final = original.copy()
    final.loc[2, "failed"] = "True"  # its accuracy is a trained network's
    put(results, "final", final)
    refused(results, "final.csv row 4: failed is True, but its test accuracy, loss and diverged say False")


def test_a_table_that_is_a_folder_is_named_so(results: Path):
    (results / "trials.csv").unlink()
    (results / "trials.csv").mkdir()
    refused(results, "trials.csv is a folder, not a table")


def test_final_runs_in_epochs_that_final_does_not_list_are_refused(results: Path):
    final = table(results, "final")
    put(results, "final", final[~(of_cell(final, "tuned", 5) & (final.seed == "6"))])
    edit_config(
        results,
        lambda c: c.__setitem__(
            "in_progress", [{"cell": "tuned-depth5", "what": "final runs", "done": 11, "budget": 12}]
        ),
    )
    refused(
        results,
        "epochs.csv has epochs of the final run of tuned-depth5, seed 6 (trial ",
        "), which final.csv does not list",
    )


def test_tuning_epochs_of_a_trial_trials_does_not_list_are_refused(results: Path):
    epochs = table(results, "epochs")
    stray = epochs[(epochs.run == "tuning")].iloc[[0]].assign(trial="999")
    put(results, "epochs", pd.concat([epochs, stray], ignore_index=True))
    refused(results, "epochs.csv has epochs of tuning trial 999 of")


# --- 5: `retrained` names the trial each cell's final runs retrain -------------------------------------


@pytest.mark.parametrize("edit", ["all false", "two in a cell", "another trial"])
def test_a_retrained_column_that_does_not_match_final_is_refused(results: Path, edit: str):
    trials = table(results, "trials")
    cell = of_cell(trials, "tuned", 4)
    chosen = cell & (trials.retrained == "True")
    other = trials.index[cell & ~chosen][0]
    if edit == "all false":
        trials["retrained"] = "False"
        words = ("marks no trial of tuned-depth3 as retrained, yet final.csv holds 12 runs retrained from its trial",)
    elif edit == "two in a cell":
        trials.loc[other, "retrained"] = "True"
        words = ("marks 2 trials of tuned-depth4 as retrained",)
    else:
        trials.loc[chosen, "retrained"] = "False"
        trials.loc[other, "retrained"] = "True"
        source = table(results, "final").loc[lambda f: of_cell(f, "tuned", 4), "source_trial"].iloc[0]
        words = (f"marks trial {trials.trial[other]} of tuned-depth4 as retrained", f"retrain trial {source}")
    put(results, "trials", trials)
    refused(results, *words)


# --- 6: one row per key -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "why"), [("trials", "same cell and trial number"), ("epochs", "same run and epoch")])
def test_a_duplicated_row_is_refused(results: Path, name: str, why: str):
    lines = (results / f"{name}.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (results / f"{name}.csv").write_text("".join([*lines, lines[5]]), encoding="utf-8")
    refused(results, f"{name}.csv row {len(lines) + 1}", why)


# --- 3, 8: what a numeric cell may hold, bounds included ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "column", "value", "what"),
    [
        ("final", "budget", "-5", "a whole number from 1 to 2,147,483,647"),
        ("trials", "budget", "-5", "a whole number from 1 to 2,147,483,647"),
        ("epochs", "budget", "-5", "a whole number from 1 to 2,147,483,647"),
        ("final", "seed", "1e308", "a whole number from 1 to 2,147,483,647"),
        ("final", "seed", str(2**31), "a whole number from 1 to 2,147,483,647"),
        ("final", "n_params", "1e308", "a whole number from 1 to 2,147,483,647"),
        ("trials", "train_flops", "1e308", "a number from 0 to below 1e+30"),
        ("final", "train_flops", "inf", "a number from 0 to below 1e+30"),
        ("final", "source_trial", "-2", "a trial number from -1"),
        ("epochs", "run", "warmup", "tuning or final"),
    ],
)
def test_a_value_out_of_its_kind_or_bounds_is_refused_naming_row_and_column(results, name, column, value, what):
    df = table(results, name)
    row = df.index[df.budget != ""][3] if (df.budget != "").sum() > 3 else df.index[3]
    df.loc[row, column] = value
    put(results, name, df)
    refused(results, f"{name}.csv row {row + 2}, column {column!r}", what)


# --- 4, 9: config.json must be there, and of the dataclasses' types ---------------------------------------


def test_a_folder_without_config_json_is_refused_with_how_to_regenerate_it(results: Path):
    (results / "config.json").unlink()
    refused(results, "has no config.json", "python -m study.report --storage URL --out DIR")


BAD_CONFIGS = {
    "experiments.matched.band": (
        lambda c: c["experiments"]["matched"].__setitem__("band", "abc"),
        "a list of numbers",
    ),
    "experiments.matched.min_width": (
        lambda c: c["experiments"]["matched"].__setitem__("min_width", None),
        "not a whole number",
    ),
    "experiments.recipe.claims": (
        lambda c: c["experiments"]["recipe"].__setitem__("claims", [[1, 2]]),
        "a list of [whole number, whole number, number] lists",
    ),
    "experiments.tuned.space": (
        lambda c: c["experiments"]["tuned"].__setitem__("space", "wide"),
        "an object with lr, width, taper, max_epochs, min_width",
    ),
    "experiments.tuned.space.lr": (
        lambda c: c["experiments"]["tuned"]["space"].__setitem__("lr", [0.0, 1.0]),
        "not above 0",
    ),
    "in_progress[0]": (lambda c: c.__setitem__("in_progress", [{"cell": "x"}]), "an object with cell"),
    "experiments.recipe.funnel": (
        lambda c: c["experiments"]["recipe"].__setitem__("funnel", None),
        "a list of whole numbers",
    ),
    "train_subset": (lambda c: c.__setitem__("train_subset", "abc"), "a whole number or null"),
    "in_progress": (lambda c: c.__setitem__("in_progress", "yes"), "not a list of objects"),
    "experiments.matched.checks": (
        lambda c: c["experiments"]["matched"].__setitem__("checks", ["horizon", "runnerup"]),
        "not a list of horizon",
    ),
    "experiments.recipe.depths": (
        lambda c: c["experiments"]["recipe"].__setitem__("depths", [1, 99]),
        "depths in 1..8",
    ),
    "experiments": (lambda c: c["experiments"].__setitem__("wide", {}), "not one of recipe, matched, tuned"),
}


@pytest.mark.parametrize("key", BAD_CONFIGS)
def test_a_config_json_value_of_the_wrong_type_is_one_line_naming_its_key(finished: Path, tmp_path: Path, key: str):
    change, what = BAD_CONFIGS[key]
    shutil.copy(finished / "config.json", tmp_path / "config.json")
    edit_config(tmp_path, change)
    with pytest.raises(UserError) as e:
        read_config(tmp_path / "config.json")
    assert f"config.json: {key} " in str(e.value) and what in str(e.value) and "\n" not in str(e.value)


def test_the_report_command_refuses_a_mistyped_config_json(results: Path):
    edit_config(results, lambda c: c["experiments"]["recipe"].__setitem__("claims", [[1, 2]]))
    refused(results, "config.json: experiments.recipe.claims is [[1, 2]]")


def test_the_config_json_read_is_the_studys_own_config(finished: Path):
    """config.json builds the StudyConfig the study ran with: its cells and seeds are the committed study's."""
    config, cfg = read_config(finished / "config.json")
    assert cfg.split_per_seed and len(cfg.matched.band) == 5 and cfg.recipe.claims[0] == (1, 2, 0.9211)
    assert len(cfg.cells()) == len(pd.read_csv(finished / "final.csv").groupby(tables.CELL_COLUMNS, dropna=False))
    assert cfg.seeds(Cell("tuned", 4)) == 6 and cfg.n_trials(Cell("matched", 3, 242762)) == 0
    assert cfg.final_runs(Cell("matched", 3, 242762)) == 16 * 5 and cfg.final_runs(Cell("tuned", 4)) == 12


def test_a_study_of_the_grid_design_is_refused_in_one_line_before_its_tables_are_read(results: Path):
    """A matched experiment without a band is the grid design (before the factorial): refused as such, whatever its
    tables hold (the old ones have a runner-up check this version cannot read), with the commit that reads it."""
    edit_config(results, lambda c: c["experiments"]["matched"].pop("band"))
    with pytest.raises(UsageError) as e:
        report.main(["--results", str(results)])
    message = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in message, message
    assert "was stored by the grid design" in message and "use commit 88d9cef to read it" in message


def test_a_resumed_study_reads_only_the_name_of_a_mistyped_config_json(results: Path):
    """study.depth resuming into a folder checks config.json's name only (then rewrites config.json from the
    storage): a mistyped value of its own study is no traceback, another name one line."""
    edit_config(results, lambda c: c["experiments"]["tuned"].__setitem__("space", "wide"))
    refuse_other_study(results, "full")  # its own study: goes on, and rewrites config.json
    edit_config(results, lambda c: c.__setitem__("name", [1]))
    with pytest.raises(UsageError, match="holds the tables of study \\[1\\], not 'full'"):
        refuse_other_study(results, "full")


# --- 10: throughput.csv ----------------------------------------------------------------------------------


def test_a_throughput_table_without_the_columns_the_figures_read_is_refused(results: Path):
    throughput = table(results, "throughput")
    put(results, "throughput", throughput[["model", "depth", "batch_size", "samples_per_s"]])
    refused(results, "throughput.csv has no column 'pipeline'", "python -m mnist_bench.throughput")
    put(results, "throughput", throughput.drop(columns=["batch_order"]))
    refused(results, "throughput.csv has pack rows but no column 'batch_order'")


# --- 11: tables are written whole or not at all ----------------------------------------------------------


def small_storage(tmp: Path) -> str:
    """An SQLite storage with one tuned cell of the smoke study: one finished trial, no final run yet."""
    from test_cli import storage_with

    return storage_with(tmp, final=True, name="study.db")


def test_a_full_disk_mid_write_keeps_every_old_table_and_says_one_line(tmp_path: Path, monkeypatch):
    storage = optuna.storages.RDBStorage(small_storage(tmp_path))
    out = tmp_path / "out"
    tables.write_tables(storage, "smoke", [Cell("tuned", 2)], out)
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(tables.OUTPUT_FILES)
    for name in written:  # "old" files, each distinct, to see that none is replaced
        (out / name).write_bytes(f"old {name}\n".encode())

    real_open = open

    class HalfWritten:
        """A file on a disk that fills up half-way through the write."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return HalfWritten(f) if "final.csv" in str(path) and "w" in mode else f

    monkeypatch.setattr(files, "open", full_disk, raising=False)
    with pytest.raises(UserError) as e:
        tables.write_tables(storage, "smoke", [Cell("tuned", 2)], out)
    message = str(e.value)
    assert message.startswith(f"cannot write {out / 'final.csv'} ([Errno 28] No space left on device)"), message
    assert "as they were" in message and "\n" not in message
    assert sorted(p.name for p in out.iterdir()) == written  # no temporary file left behind
    for name in written:  # trials.csv, written before final.csv failed, is not replaced either
        assert (out / name).read_bytes() == f"old {name}\n".encode(), name


def test_an_unwritable_file_keeps_the_old_one(tmp_path: Path, monkeypatch):
    (tmp_path / "report.md").write_text("old\n", encoding="utf-8")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(
        UserError, match=r"cannot write .*report\.md \(\[Errno 28\] No space left on device\); the file"
    ):
        files.write_file(tmp_path / "report.md", "new\n")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == "old\n"


# --- 12: UTF-8 whatever the locale, and printing never fails --------------------------------------------

C_LOCALE = {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}


def test_files_are_utf8_under_a_c_locale_with_an_out_path_holding_e_acute(tmp_path: Path):
    """Under LC_ALL=C without UTF-8 mode, "é" in a command-line path reaches Python as surrogate escapes and the
    locale's encoding is ASCII: the tables (whose command column holds the path) and the report ("±") are
    still written, as UTF-8, in the folder of that name, and read back."""
    out = tmp_path / "é"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mnist_bench import files\nfrom study.results import read_config\n"
        "out = Path(sys.argv[1])\n"
        "out.mkdir()\n"
        "files.write_files(out, {'report.md': '\\u00b10.20 points', 'final.csv': 'command\\npython -m study.depth "
        "--out ' + sys.argv[1] + '\\n', 'config.json': '{\"name\": \"\\u00b1\", \"experiments\": {}}'})\n"
        "print(read_config(out / 'config.json')[0]['name'] == '\\u00b1', sys.getfilesystemencoding())\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, os.fsencode(out)],
        capture_output=True,
        env={**os.environ, **C_LOCALE},
        cwd=ROOT,
        timeout=120,
    )
    assert p.returncode == 0 and p.stdout.split()[0] == b"True", p.stderr.decode(errors="replace")
    assert (out / "report.md").read_bytes() == "±0.20 points".encode()
    assert (out / "final.csv").read_bytes().endswith(f"--out {out}\n".encode())


def test_printing_never_fails_on_the_streams_encoding(monkeypatch):
    streams = {name: io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict") for name in ("stdout", "stderr")}
    for name, stream in streams.items():
        monkeypatch.setattr(sys, name, stream)
    cli.printable_streams()
    print("±0.20 in /tmp/é and /tmp/\udcff")
    print("error: /tmp/é has no config.json", file=sys.stderr)
    out = {name: (s.flush(), s.buffer.getvalue())[1] for name, s in streams.items()}
    assert out["stdout"] == b"\\xb10.20 in /tmp/\\xe9 and /tmp/\xff\n"  # a surrogate escape: its own byte
    assert out["stderr"] == b"error: /tmp/\\xe9 has no config.json\n"


def test_the_report_command_prints_an_undecodable_path_and_refuses_in_one_line(finished: Path, tmp_path: Path):
    """A --results path holding a byte UTF-8 cannot decode (a surrogate escape in Python) is printed to a strict
    UTF-8 stdout (a UTF-8 locale's, as PYTHONIOENCODING=utf-8 makes it) as that byte, not a UnicodeEncodeError
    traceback, then a folder without config.json is refused in one line."""
    folder = os.path.join(os.fsencode(tmp_path), b"r\xff")
    os.mkdir(folder)
    for name in ("trials.csv", "epochs.csv", "final.csv"):
        shutil.copy(finished / name, os.path.join(folder, name.encode()))
    with open(os.path.join(folder, b"report-options.json"), "w", encoding="utf-8") as f:
        json.dump({"compare": None, "replicate": None, "margin_points": 0.3}, f)
    p = subprocess.run(
        [sys.executable, "-m", "study.report", "--results", folder],
        capture_output=True,
        env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONUTF8": "0"},
        cwd=ROOT,
        timeout=120,
    )
    err = p.stderr.decode("utf-8", "backslashreplace").strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and "has no config.json" in err
    assert b"r\xff/report-options.json records: --margin 0.3" in p.stdout
