"""The house: imports run one way (entry points -> experiments -> shared vocabulary -> library)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(package: str) -> dict[str, set[str]]:
    """{module: modules of the same package it imports, at any level of the file}."""
    graph = {}
    for path in (ROOT / package).glob("*.py"):
        name = path.stem
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    found |= {node.module} if node.module else {a.name for a in node.names}
                elif node.module and node.module.startswith(f"{package}."):
                    found.add(node.module.split(".")[1])
                elif node.module == package:
                    found |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(f"{package}.")}
        graph[name] = {m for m in found if (ROOT / package / f"{m}.py").exists()} - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_no_import_cycles():
    for package in ("mnist_bench", "study"):
        assert cycle(imports(package)) is None, f"{package}: {' -> '.join(cycle(imports(package)))}"


def test_library_never_imports_the_study_and_vocabulary_imports_nothing_above_it():
    lib = imports("mnist_bench")
    for path in (ROOT / "mnist_bench").glob("*.py"):
        assert "from study" not in path.read_text() and "import study" not in path.read_text(), path
    study = imports("study")
    assert study["config"] == set()
    assert study["storage"] == set()  # opening a storage knows no study and no claim
    assert study["coord"] <= {"config", "storage"}
    assert study["engine"] <= {"config", "coord", "storage"}
    assert lib["cli"] <= {"errors", "interrupt", "paths"}  # light: a command answers Ctrl-C before torch loads


def test_cycle_detector_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_statistics_figures_and_document_each_have_their_module():
    study = imports("study")
    assert study["stats"] == set()  # scipy and statsmodels only
    assert study["factorial"] <= {"stats", "config"}  # the factorial read back and its estimates: no words
    assert study["analysis"] <= {"stats", "config", "factorial"}
    assert study["figures"] <= {"analysis"}
    assert "stats" not in study["figures"] and "figures" not in study["analysis"]
    assert study["markdown"] <= {"analysis", "stats"}  # how numbers print; no document logic
    assert study["design"] <= {"analysis", "config", "stats"}  # the checks computed: no words, no figures
    assert study["sections"] <= {"analysis", "config", "design", "factorial", "figures", "markdown", "stats"}
    assert "design" not in study["analysis"] and "report" not in study["design"] | study["sections"]
    assert study["serve"] <= {"config", "storage"}  # the proxy knows storages, not studies or claims
    assert study["tables"] <= {"config", "coord", "storage"}  # tables from the storage: no statistics
    assert study["results"] <= {"config", "tables"}  # a results folder read back and checked: no statistics


def locked() -> dict[str, str]:
    """{distribution name (normalised): version} pinned in requirements.lock."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        spec = line.split("#")[0].strip()
        if "==" in spec:
            name, version = spec.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_the_lock_pins_every_dependency_exactly_and_the_environment_matches_it():
    """What `make study` / `make test` install is exactly the lock: every locked distribution that is
    installed has the locked version, and every direct dependency of the project is locked."""
    import importlib.metadata as md
    import re

    import tomllib

    pins = locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d)[0].lower().replace("_", "-") for d in direct}
    assert names <= set(pins), f"not in requirements.lock: {sorted(names - set(pins))}"
    installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions()}
    wrong = {n: (installed[n], v) for n, v in pins.items() if n in installed and installed[n] != v}
    assert not wrong, f"installed (left) differs from requirements.lock (right): {wrong}; run make clean test"
    assert names <= set(installed)


def test_the_committed_study_opens_in_optuna_dashboard(tmp_path):
    """`make dashboard` serves a storage with optuna-dashboard: the committed study answers HTTP 200
    (served from a copy, so the committed file is never opened for writing)."""
    import json
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    exe = Path(sys.executable).parent / "optuna-dashboard"
    if not exe.exists():
        import pytest

        pytest.skip("optuna-dashboard is not installed (the dashboard extra)")
    shutil.copy(ROOT / "results" / "study.db", tmp_path / "study.db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(exe), f"sqlite:///{tmp_path / 'study.db'}", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):  # it is up when it answers; the wait is for a slow machine, not a bound on speed
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    assert r.status == 200
                    names = {s["study_name"] for s in json.load(r)["study_summaries"]}
                    break
            except OSError:
                assert proc.poll() is None, "optuna-dashboard exited"
                time.sleep(0.2)
        else:
            raise AssertionError("optuna-dashboard never answered")
        study = json.loads((ROOT / "results" / "config.json").read_text())["name"]  # full, or full-tuning-2, ...
        assert f"{study}-matched-params242762-depth4" in names and f"{study}-tuned-depth4-final" in names
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_readme_is_read_in_a_minute_and_links_what_it_moved_out():
    """Answer first: at most 12,000 bytes; its first 40 lines hold the answer (a number in points), the answer
    figure and both commands; the method and operations pages exist and are linked; no commit hashes."""
    import re

    text = (ROOT / "README.md").read_text()
    first = "\n".join(text.splitlines()[:40])
    assert len(text.encode()) <= 12_000
    assert re.search(r"[+−-]\d+\.\d+ points", first) and "results/answer.png" in first
    assert "make study" in first and "make test" in first
    for page in ("docs/method.md", "docs/operations.md", "results/README.md"):
        assert (ROOT / page).is_file() and f"({page}" in text
    assert not re.search(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", text)
    for target in re.findall(r"\]\(([^)#]+)", text):  # every relative link points at a file here
        assert target.startswith("http") or (ROOT / target).exists(), target


def test_the_report_and_the_tables_never_load_pytorch():
    """Reading and rendering results needs no tensors: without PyTorch a report command starts in about 1.5 s,
    not 5 (every CLI test of the report pays it)."""
    import subprocess
    import sys

    code = "import sys, study.report, study.results, study.tables, study.coord; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
