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
    assert study["coord"] <= {"config"}
    assert study["engine"] <= {"config", "coord"}
    assert lib["cli"] <= {"errors", "interrupt", "paths"}  # light: a command answers Ctrl-C before torch loads


def test_cycle_detector_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
