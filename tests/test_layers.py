"""Imports go one way: front ends → services → database/domain → base (DEVELOPING.md, "Layout").

Every module of the package has a layer in `LAYERS`; a module may import its own layer and the
layers below it, never one above. Imports under `if TYPE_CHECKING:` are annotations only and
are not counted. A new module must be given its layer here (the test fails until it is), which
is the moment to ask where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "stacchip_db"

BASE, CORE, SERVICES, FRONT = range(4)
LAYER_NAMES = {BASE: "base", CORE: "database/domain", SERVICES: "services", FRONT: "front end"}

LAYERS: dict[str, int] = {
    # base: no knowledge of chips, items or the database
    "errors": BASE,
    "config": BASE,
    "text": BASE,
    "resources": BASE,
    "paths": BASE,
    "chip_schema": BASE,
    "signing": BASE,
    "storage": BASE,
    "stac_api": BASE,
    "samples": BASE,
    # database/domain: the grid and sensors, one item's chips, the schema and its SQL
    "grid": CORE,
    "sensors": CORE,
    "quality": CORE,
    "class_fractions": CORE,
    "index": CORE,
    "reader": CORE,
    "selection": CORE,
    "locations": CORE,
    "db": CORE,
    # services: whole jobs built from the layers below
    "item_sources": SERVICES,
    "indexing": SERVICES,
    "processors": SERVICES,
    "dataset": SERVICES,
    "sampler": SERVICES,
    "read_engine": SERVICES,
    "prechip": SERVICES,
    "time_series": SERVICES,
    "audit": SERVICES,
    "bandstats": SERVICES,
    "pictures": SERVICES,
    "export": SERVICES,
    "chip_formats": SERVICES,
    "synthetic": SERVICES,
    "layers": SERVICES,
    # front ends: what a user runs
    "cli": FRONT,
    "batch": FRONT,
    "demo": FRONT,
    "": FRONT,  # the package itself: its lazy public names reach every layer
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(part for part in parts if part != "__init__")


def _layer(module: str) -> int | None:
    """The layer of `stacchip_db.<module>`: its own entry, else its package's (`db.store`)."""
    while True:
        if module in LAYERS:
            return LAYERS[module]
        if "." not in module:
            return None
        module = module.rsplit(".", 1)[0]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return inside


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module below stacchip_db) of every package import in the file, at any depth."""
    tree = ast.parse(path.read_text())
    annotations_only = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "stacchip_db":
            # `from stacchip_db import storage` imports a module; `import index_items` a name
            # of the package itself (a front end)
            names = [
                f"stacchip_db.{alias.name}"
                if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file()
                else "stacchip_db"
                for alias in node.names
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name == "stacchip_db" or name.startswith("stacchip_db."):
                found.append((node.lineno, name.removeprefix("stacchip_db").lstrip(".")))
    return found


def test_every_module_has_a_layer() -> None:
    modules = [_module_name(path) for path in PACKAGE.rglob("*.py")]
    assert "db.store" in modules and "cli.index" in modules  # the walk is real
    missing = sorted(module for module in modules if _layer(module) is None)
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def _upward(path: Path, module: str) -> list[str]:
    """The imports of `path` (as `stacchip_db.<module>`) that reach a layer above its own."""
    own = _layer(module)
    found = []
    for line, imported in _imports(path):
        theirs = _layer(imported)
        if own is not None and theirs is not None and theirs > own:
            found.append(
                f"{path.name}:{line} {module} ({LAYER_NAMES[own]}) imports "
                f"{imported or 'stacchip_db'} ({LAYER_NAMES[theirs]})"
            )
    return found


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [
        finding
        for path in sorted(PACKAGE.rglob("*.py"))
        for finding in _upward(path, _module_name(path))
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_an_upward_import_is_caught_and_an_annotation_is_not(tmp_path: Path) -> None:
    """The check can fail: a domain module importing the CLI in a function is reported; the
    same import under TYPE_CHECKING is not."""
    module = tmp_path / "grid.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from stacchip_db.dataset import ChipRow\n"
        "def f():\n"
        "    from stacchip_db.cli.options import CliContext\n"
        "    import stacchip_db.errors\n"
    )
    assert _upward(module, "grid") == [
        "grid.py:5 grid (database/domain) imports cli.options (front end)"
    ]
