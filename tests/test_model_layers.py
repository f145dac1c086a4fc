"""The model depends on nothing above it: no module of `maestro/model` imports the config, `maestro
info`, data, training, the launcher or a distributed runtime at run time (type-only imports under
`TYPE_CHECKING` are allowed), so `maestro.info` may use the model without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "maestro" / "model"
ABOVE = ("maestro.config", "maestro.info", "maestro.cli", "maestro.data", "maestro.train", "maestro.eval")
ABOVE += ("maestro.parallel", "cluster", "deepspeed", "ray", "torch.distributed")


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Modules imported outside `if TYPE_CHECKING:` blocks."""
    out = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            out.extend(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def test_the_model_imports_nothing_above_it():
    bad = {}
    for path in sorted(MODEL.glob("*.py")):
        hits = [m for m in _runtime_imports(ast.parse(path.read_text())) if m.startswith(ABOVE)]
        if hits:
            bad[path.name] = hits
    assert bad == {}
