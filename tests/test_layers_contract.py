"""The layers, as imports: ``deft_cli`` (cli/) above ``deft_server`` (server/) and ``deft_client``
(clients/python/); ``deft_server`` above ``deft_runtime``; everything above ``deft_files`` (pure-Python
file conventions the client shares with the runtime). Nothing imports a layer above it, and the client
never imports the runtime (it installs without torch).

A small AST walk over every ``.py`` file of each package: every ``import x`` / ``from x import y``
(at any depth, inside functions too, since a deferred import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "deft_files": ROOT / "deft_files",
    "deft_runtime": ROOT / "deft_runtime",
    "deft_server": ROOT / "server",
    "deft_client": ROOT / "clients" / "python" / "deft_client",
    "deft_cli": ROOT / "cli",
}
#: package → the packages it must never import
FORBIDDEN = {
    "deft_files": {"deft_runtime", "deft_server", "deft_client", "deft_cli"},
    "deft_runtime": {"deft_server", "deft_client", "deft_cli"},
    "deft_server": {"deft_cli"},
    "deft_client": {"deft_runtime", "deft_server", "deft_cli"},
    "deft_cli": set(),
}


def imported_packages(source: str, filename: str) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every absolute import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted(PACKAGES[package].rglob("*.py")):
        for line, imported in imported_packages(path.read_text(encoding="utf-8"), str(path)):
            if imported in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    return bad


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_layer_imports_a_layer_above_it(package):
    assert PACKAGES[package].is_dir()
    assert violations(package) == []


def test_the_walk_sees_deferred_and_dotted_imports():
    """The checker itself: imports inside functions, ``from a.b import c`` and ``import a.b`` count;
    relative imports (inside one package) do not."""
    source = (
        "import os\ndef f():\n    from deft_server.store import x\n    import deft_cli.app\nfrom . import y\n"
    )
    assert imported_packages(source, "<test>") == [(1, "os"), (3, "deft_server"), (4, "deft_cli")]
