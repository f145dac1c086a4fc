"""The layers, read from the source (AST): no module imports from a layer above its own, no cycles.

model < parallel < train < cluster: the model depends on nothing that trains or launches it, the
engine code on no training loop, the training code on no launcher; `cluster/` uses
`maestro/train`, never the reverse. The CLI names its command modules by string (maestro/cli.py),
so it is no import of theirs. Imports inside functions count (a lazy import is still a dependency);
`if TYPE_CHECKING:` blocks too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("maestro", "shards", "cluster", "kernels")
CLI = ("maestro.cli", "maestro.cli_info", "maestro.cli_config")

# module prefix -> prefixes it must not import
FORBIDDEN = {
    "maestro.model": (
        "maestro.train",
        "maestro.parallel",
        "maestro.eval",
        "maestro.info",
        "maestro.data",
        "cluster",
        *CLI,
    ),
    "maestro.parallel": ("maestro.train", "maestro.eval", "cluster", *CLI),
    "maestro.train": ("cluster", "maestro.eval"),
    "maestro": ("cluster",),
    "shards": ("cluster",),
    "kernels": ("maestro.train", "maestro.parallel", "cluster", *CLI),
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (`from a import b` counts a.b when that is a module,
    else a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out.update(subs)  # `from pkg import module` imports the module
            if len(subs) < len(node.names):
                out.add(base)  # names defined in `base` itself
    return {m for m in out if m.split(".")[0] in PACKAGES and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: {m for m in _imports(n, p, known) if m in known} for n, p in mods.items()}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_module_imports_from_a_higher_layer():
    graph = _graph()
    bad = []
    for name, deps in sorted(graph.items()):
        for prefix, banned in FORBIDDEN.items():
            if not _within(name, prefix):
                continue
            bad += [f"{name} -> {d}" for d in sorted(deps) for b in banned if _within(d, b)]
    assert not bad, "upward imports:\n" + "\n".join(sorted(set(bad)))


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports_of_every_form(tmp_path):
    """The AST reader finds `import a.b`, `from a import b`, relative and function-level imports."""
    src = tmp_path / "mod.py"
    src.write_text(
        "import maestro.config\nfrom maestro import storage\nfrom .sibling import x\n"
        "def f():\n    from cluster import launch\n"
    )
    known = {"maestro.config", "maestro.storage", "cluster.launch", "maestro.train.sibling"}
    found = _imports("maestro.train.mod", src, known)
    assert {"maestro.config", "maestro.storage", "maestro.train.sibling", "cluster.launch"} <= found
