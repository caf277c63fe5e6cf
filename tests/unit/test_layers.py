"""The import rules of docs/architecture.md: a package imports only packages of lower layers, and the packages
that share a layer do not import each other. Function-level (lazy) imports count like top-level ones."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "wsss"

# Lowest first; keep in step with the diagram in docs/architecture.md. "wsss" is the package root (its
# __version__); the last layer holds the commands, which may import anything and each other.
LAYERS: list[set[str]] = [
    {"wsss", "utils", "registry", "recipes"},
    {"config"},
    {"data"},
    {"cam", "viz"},
    {"models", "losses"},
    {"methods"},
    {"build"},
    {"evaluation"},
    {"engine"},
    {"export"},
    {"api"},
    {"report", "bench", "demo", "cli", "cli_data", "cli_stage", "__main__", "wsss (root)"},
]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
TOP = len(LAYERS) - 1


def top_package(module: str) -> str | None:
    """'wsss.data.io' -> 'data'; 'wsss' -> 'wsss'; a module outside wsss -> None."""
    parts = module.split(".")
    if parts[0] != "wsss":
        return None
    return parts[1] if len(parts) > 1 else "wsss"


def source_package(path: Path) -> str:
    """The top package a file of src/wsss belongs to; the root __init__ re-exports the API, so it sits on top."""
    rel = path.relative_to(SRC)
    if rel.parts == ("__init__.py",):
        return "wsss (root)"
    return rel.parts[0].removesuffix(".py")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1])  # a package's __init__ resolves relative imports against the package too
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from wsss import api` names a package in the imported names, not in the module
            if name == "wsss":
                found += [(node.lineno, f"wsss.{a.name}") for a in node.names if a.name != "__version__"]
    return found


def violations(files: list[Path]) -> list[str]:
    """'file:line: a imports b (...)' for each import that breaks the layer rules."""
    out = []
    for f in files:
        src = source_package(f)
        if src not in LEVEL:
            out.append(f"{f.relative_to(SRC)}: package '{src}' has no layer (add it to LAYERS and the diagram)")
            continue
        for line, mod in imported_modules(f):
            dst = top_package(mod)
            if dst is None or dst == src:
                continue
            if dst not in LEVEL:
                out.append(f"{f.relative_to(SRC)}:{line}: imports '{mod}', a package with no layer")
            elif LEVEL[src] == TOP:
                continue
            elif LEVEL[dst] > LEVEL[src]:
                out.append(
                    f"{f.relative_to(SRC)}:{line}: {src} (layer {LEVEL[src]}) imports {mod} (layer {LEVEL[dst]})"
                )
            elif LEVEL[dst] == LEVEL[src]:
                out.append(f"{f.relative_to(SRC)}:{line}: {src} imports {mod}, a package of its own layer")
    return out


def test_the_source_tree_keeps_the_layer_rules():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50
    assert violations(files) == []


@pytest.mark.parametrize(
    ("where", "code", "expected"),
    [
        # a model calling the engine's collectives: the breach this rule was written for
        (
            "models/blocks/x.py",
            "def f():\n    from wsss.engine import trainer\n",
            "models (layer 4) imports wsss.engine (layer 8)",
        ),
        (
            "data/x.py",
            "from ..evaluation.confusion import ConfusionMatrix\n",
            "data (layer 2) imports wsss.evaluation.confusion",
        ),
        ("cam/x.py", "from wsss import viz\n", "cam imports wsss.viz, a package of its own layer"),
        ("losses/x.py", "import wsss.models.heads\n", "losses imports wsss.models.heads, a package of its own layer"),
        ("utils/x.py", "from wsss.data.io import DataError\n", "utils (layer 0) imports wsss.data.io"),
    ],
)
def test_a_breach_is_reported_with_file_and_line(tmp_path, monkeypatch, where, code, expected):
    root = tmp_path / "wsss"
    (root / where).parent.mkdir(parents=True)
    (root / where).write_text(code)
    monkeypatch.setattr(sys.modules[__name__], "SRC", root)
    found = violations([root / where])
    assert len(found) == 1 and expected in found[0] and found[0].startswith(f"{where}:")


def test_allowed_imports_are_not_reported(tmp_path, monkeypatch):
    root = tmp_path / "wsss"
    cases = {
        "engine/x.py": "from wsss.utils import dist\nfrom wsss.evaluation import evaluators\nfrom . import hooks\n",
        "cli.py": "from wsss.api import load\nfrom wsss import cli_stage\n",
        "methods/x.py": "from wsss import __version__\nimport torch\nfrom wsss.models.heads import CAMHead\n",
    }
    for where, code in cases.items():
        (root / where).parent.mkdir(parents=True, exist_ok=True)
        (root / where).write_text(code)
    monkeypatch.setattr(sys.modules[__name__], "SRC", root)
    assert violations([root / w for w in cases]) == []
