"""The package's layers and what each may import, read from the source (every import, at
module level or inside a function).

* ``relay.core`` is the sans-IO core: no I/O library, no store, nothing of the other layers.
* ``relay.wire`` (framing, sockets, the fast path) and ``relay.ops`` (metrics, logs, the load
  guard) build on the core only (and the settings).
* ``relay.usage`` (stores, accounting, auth, minting) builds on the core, ops and the settings.
* ``relay.server`` puts them together; ``relay.clients`` (talk, the page) is imported by the CLI
  alone, so the server never depends on a client.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "src" / "relay"

#: Relay layers each layer may import (its own always).
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "wire": {"core", "config"},
    "ops": {"core", "config"},
    "usage": {"core", "ops", "config"},
    "server": {"core", "wire", "ops", "usage", "config"},
    "clients": {"core", "wire", "config"},
    "config": {"core", "usage"},
    "cli": {"core", "wire", "ops", "usage", "server", "clients", "config"},
    "__main__": {"cli"},
    "__init__": set(),
}

#: Third-party packages that do I/O, which the core may not import.
IO_PACKAGES = {
    "trio", "trio_websocket", "hypercorn", "wsproto", "h11", "httpx", "coredis", "sqlite3",
    "socket", "ssl", "select", "prometheus_client", "outcome", "websockets",
}


def _layer(module: str) -> str:
    """``relay.core.bridge`` → ``core``; ``relay.cli`` → ``cli``."""
    return module.split(".")[1]


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            if not node.module:  # from . import x: x is a module
                names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


MODULES = _modules()


def test_every_module_is_in_a_known_layer() -> None:
    assert {_layer(m) for m in MODULES if m != "relay"} <= set(MAY_IMPORT)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "relay"))
def test_a_module_imports_only_the_layers_below_it(module: str) -> None:
    layer = _layer(module)
    allowed = MAY_IMPORT[layer] | {layer}
    crossing = sorted(
        name
        for name in _imports(module, MODULES[module])
        if name.startswith("relay.") and _layer(name) not in allowed
    )
    assert not crossing, f"{module} ({layer}) imports {crossing}; {layer} may import {sorted(allowed)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("relay.core")))
def test_the_core_does_no_io(module: str) -> None:
    io = sorted(
        name for name in _imports(module, MODULES[module]) if name.split(".")[0] in IO_PACKAGES
    )
    assert not io, f"{module} is sans-IO but imports {io}"


def test_the_rules_see_relative_imports() -> None:
    """The checker itself: a relative import out of the core would be caught."""
    path = MODULES["relay.core.bridge"]
    assert "relay.core.events" in _imports("relay.core.bridge", path)
    assert _layer("relay.server.pair") == "server"
