"""The package's import graph (module-level and function-level imports alike): no circle, no lower layer
importing a higher one, and nothing in the library importing a demo."""

from __future__ import annotations

import ast
from pathlib import Path

SWIM = Path(__file__).resolve().parents[1] / "swim"

# A module may import modules of its own layer or of lower layers only (the first matching prefix counts).
LAYERS = [
    ("swim.data.control_tokens", 0),
    ("swim.data.geometry", 0),
    ("swim.modeling.families", 1),
    ("swim.data", 1),
    ("swim.modeling", 2),
    ("swim.tiny", 2),
    ("swim.checkpoint", 3),
    ("swim.seg", 3),
    ("swim.trainer", 4),
    ("swim.eval", 5),
    ("swim.vis", 5),
    ("swim.merge_lora", 6),
    ("swim.train", 6),
    ("swim.bench", 6),
    ("swim.testing", 6),
    ("swim.demos", 7),
    ("swim.cli", 8),
    ("swim", 0),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SWIM.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The swim modules `path` imports, anywhere in the file (`from a.b import c` counts a.b.c if it is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SWIM.rglob("*.py")}
    return {m: imports_of(p, set(files)) - {m} for m, p in files.items()}


def layer(module: str) -> int:
    return next(level for prefix, level in LAYERS if module == prefix or module.startswith(prefix + "."))


def test_no_import_circle():
    edges = graph()
    # a package's __init__ importing its own modules is not a circle
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in edges.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_no_lower_layer_imports_a_higher_one():
    upward = sorted(
        f"{m} -> {d}"
        for m, deps in graph().items()
        for d in deps
        if layer(d) > layer(m) and not d.startswith(m + ".")
    )
    assert not upward, upward
