"""Where the OpenAI SDK may be imported: the client module, and nothing the models need.
The HTTP libraries under it also in the transports' guard (llm.egress)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import PROJECT

SDK = {"openai", "httpx2", "aiohttp"}
HTTP = SDK - {"openai"}
APPS = ("platform_site", "credentials", "llm")


def module_file(name: str) -> Path | None:
    base = PROJECT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_at_load(path: Path) -> set[str]:
    """Modules a file imports when it is loaded: top level, not under TYPE_CHECKING."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def loaded_with(module: str) -> set[str]:
    """Every module loading `module` loads, following the project's own imports."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is not None:
            todo.extend(imported_at_load(path))
    return seen


def test_the_models_load_no_sdk():
    loaded = {name.split(".")[0] for name in loaded_with("llm.models")}

    assert "llm" in loaded
    assert loaded & SDK == set()


def importers_of(modules: set[str]) -> set[str]:
    return {
        str(path.relative_to(PROJECT))
        for app in APPS
        for path in (PROJECT / app).rglob("*.py")
        if {name.split(".")[0] for name in imported_at_load(path)} & modules
    }


def test_only_the_client_module_imports_the_sdk():
    assert importers_of({"openai"}) == {"llm/clients.py"}
    assert importers_of(HTTP) == {"llm/clients.py", "llm/egress.py"}
