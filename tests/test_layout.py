"""The layout: imports between the project's files flow one way (no cycle), and no script (a file
with a __main__ block) imports another script."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = {p.stem: p for p in REPO.glob("*.py")}


def imports_of(path):
    """The project modules a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(FILES)


def is_script(path):
    return "__main__" in path.read_text()


def test_no_script_imports_another():
    scripts = {name for name, path in FILES.items() if is_script(path)}
    assert {"train", "generate_images", "evaluate", "bench", "convert", "explore"} <= scripts
    for name, path in FILES.items():
        assert not imports_of(path) & scripts, (name, imports_of(path) & scripts)


def test_imports_have_no_cycle():
    graph = {name: imports_of(path) for name, path in FILES.items()}
    done, active = set(), []

    def visit(name):
        assert name not in active, " -> ".join(active[active.index(name):] + [name])
        if name in done:
            return
        active.append(name)
        for other in sorted(graph[name]):
            visit(other)
        active.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
