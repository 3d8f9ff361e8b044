"""The library's layout: ``herald/`` never reaches into ``app/``, names no chat, and its layers import one way.

The import graph is read from the source with ``ast`` (nothing is imported to build it), so a
module that would only import ``app`` on some branch is caught too. The rules are DESIGN.md's
"Library and application": imports flow ``app/`` → ``herald``; the core modules (events,
operations, protocol) import nothing of Herald's but each other, ``logs`` and ``settings``;
``broker/`` imports neither ``http/`` nor ``hub``; ``worker/`` talks only to ``broker/`` and the core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import herald

HERALD = Path(herald.__file__).resolve().parent
ROOT = HERALD.parent
CORE = {"herald.events", "herald.operations", "herald.protocol"}
SHARED = {"herald.logs", "herald.settings"}
"""Modules every process uses, allowed to every layer."""
CHAT_NAMES = ("/chats", "chats/", "ChatMessage")


def module_name(path: Path) -> str:
    """``herald/http/push.py`` → ``herald.http.push``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of this repository."""
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module ``source`` (the code of ``module``) imports, absolute, ``TYPE_CHECKING`` ones included.

    ``from pkg import name`` counts as ``pkg.name`` when that is a module, else as ``pkg``. A call of
    ``importlib.import_module`` or ``__import__`` with a literal name counts as an import of that name.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                found.add(first.value)
    return found


def herald_imports(path: Path) -> set[str]:
    """The modules of ``herald`` (and anything else) that the file at ``path`` imports."""
    return imports_of(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def herald_files(*suffixes: str) -> list[Path]:
    """The files under ``herald/`` with these suffixes, sorted."""
    return sorted(p for p in HERALD.rglob("*") if p.suffix in suffixes and "__pycache__" not in p.parts)


def herald_deps(path: Path) -> set[str]:
    """What the file at ``path`` imports of Herald, other than itself and its own package."""
    own = module_name(path)
    return {m for m in herald_imports(path) if m == "herald" or m.startswith("herald.")} - {own}


def in_layer(name: str, allowed: set[str]) -> bool:
    """Whether module ``name`` is one of ``allowed`` or inside one of them (``herald.broker`` covers its modules)."""
    return any(name == a or name.startswith(a + ".") for a in allowed)


def param(path: Path) -> object:
    """``path`` as a test parameter named by its place in the repository."""
    return pytest.param(path, id=str(path.relative_to(ROOT)))


# The checks themselves -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import app", {"app"}),
        ("import app.main as m", {"app.main"}),
        ("from app.chat import chat", {"app.chat"}),
        ("from app import main", {"app.main"}),
        ("import importlib\nimportlib.import_module('app.main')", {"importlib", "app.main"}),
        ("from importlib import import_module\nimport_module('app')", {"importlib", "app"}),
        ("__import__('app.chat.handlers')", {"app.chat.handlers"}),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from app.chat import chat", {"typing", "app.chat"}),
        ("from .. import hub", {"herald.hub"}),
        ("from ..broker.base import Broker", {"herald.broker.base"}),
        ("from . import problems", {"herald.http.problems"}),
    ],
)
def test_the_import_reader_sees_every_form_of_import(source: str, expected: set[str]) -> None:
    assert imports_of(source, "herald.http.push") == expected


# herald never imports app --------------------------------------------------------------

@pytest.mark.parametrize("path", herald_files(".py"), ids=lambda p: str(p.relative_to(ROOT)))
def test_herald_never_imports_the_application(path: Path) -> None:
    reaching = sorted(m for m in herald_imports(path) if m == "app" or m.startswith("app."))
    assert reaching == [], f"{path.relative_to(ROOT)} imports {reaching}: herald/ must not depend on app/"


@pytest.mark.parametrize("path", [param(p) for p in herald_files(".py", ".js")])
def test_herald_names_no_chat_path_or_event(path: Path) -> None:
    named = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1)
             if any(name in line for name in CHAT_NAMES)]
    assert named == [], f"{path.relative_to(ROOT)} names the chat application: {named}"


# Layers --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [HERALD / "events.py", HERALD / "operations.py", HERALD / "protocol.py"],
                         ids=lambda p: p.name)
def test_the_core_imports_only_itself_logs_and_settings(path: Path) -> None:
    outside = sorted(m for m in herald_deps(path) if not in_layer(m, CORE | SHARED))
    assert outside == [], f"core module {path.name} imports {outside}"


@pytest.mark.parametrize("path", sorted((HERALD / "broker").glob("*.py")), ids=lambda p: p.name)
def test_the_broker_imports_neither_http_nor_the_hub(path: Path) -> None:
    upward = sorted(m for m in herald_deps(path) if in_layer(m, {"herald.http", "herald.hub"}))
    assert upward == [], f"broker/{path.name} imports {upward}"


@pytest.mark.parametrize("path", [param(p) for p in sorted((HERALD / "worker").glob("*.py"))])
def test_the_worker_talks_only_to_the_broker_and_the_core(path: Path) -> None:
    allowed = CORE | SHARED | {"herald.broker", "herald.worker"}
    outside = sorted(m for m in herald_deps(path) if not in_layer(m, allowed))
    assert outside == [], f"worker/{path.name} imports {outside}"


# The public API ------------------------------------------------------------------------

def test_the_public_api_imports_and_documents_each_name() -> None:
    from herald import Context, Domain, Failed, Retry, Settings, create_app

    for public in (create_app, Domain, Context, Settings, Failed, Retry):
        assert (public.__doc__ or "").strip(), f"{public.__name__} has no docstring"
        assert public.__module__.startswith("herald."), public
    for name in ("create_app", "Domain", "Context", "Settings", "Failed", "Retry"):
        assert name in herald.__all__
