"""The repository stands alone: no tracked file reaches outside it.

A user has the repository (or the wheel) and nothing beside it. CI's machine happens to have
a `shared/` folder next to the clone, so a reference to it would pass CI and fail every user:
this test is the guard.
"""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO

# Spelt in pieces, so that this file does not match itself.
_SHELF = "shared"
OUTSIDE = re.compile(rf"\.\./{_SHELF}\b|{_SHELF}/fixtures|{_SHELF}/design")


def _tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, text=True, check=True
    )
    return [name for name in listed.stdout.split("\0") if name]


def test_no_tracked_file_names_a_folder_outside_the_repository() -> None:
    files = _tracked_files()
    assert "tests/conftest.py" in files  # the listing is real, not empty
    offenders = []
    for name in files:
        path = REPO / name
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        offenders += [f"{name}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert not offenders, "tracked files reach outside the repository: " + "; ".join(offenders)


def test_fixture_links_stay_inside_the_repository() -> None:
    links = [REPO / name for name in _tracked_files() if (REPO / name).is_symlink()]
    assert links, "tests/data/stac links the demo's items (stacchip_db/demo_data)"
    for link in links:
        target = link.resolve()
        assert target.is_file(), f"{link} points at {target}, which does not exist"
        assert target.is_relative_to(REPO), f"{link} points outside the repository: {target}"


def test_every_library_the_package_imports_is_a_runtime_dependency() -> None:
    """A wheel installed with its dependencies alone must import: every third-party module
    that `stacchip_db` imports comes from a distribution that pyproject.toml requires (the
    demo's server stack from its `demo` extra). The tests' environment has the test extras
    too, so a missing dependency would not show there any other way."""
    import ast
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {Requirement(r).name.lower().replace("_", "-") for r in requirements}

    runtime = names(project["dependencies"])
    demo = names(project["optional-dependencies"]["demo"])
    providers = packages_distributions()
    missing = []
    for path in sorted((REPO / "stacchip_db").rglob("*.py")):
        allowed = runtime | demo if path.name == "demo.py" else runtime
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top == "stacchip_db" or top in sys.stdlib_module_names:
                    continue
                dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                if not dists & allowed:
                    missing.append(f"{path.relative_to(REPO)} imports {module} ({dists})")
    assert "stacchip_db/cli/__init__.py" in {  # the walk saw the package
        str(p.relative_to(REPO)) for p in (REPO / "stacchip_db").rglob("*.py")
    }
    assert not missing, "not in pyproject.toml's dependencies: " + "; ".join(missing)
