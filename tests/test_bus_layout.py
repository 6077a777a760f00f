"""The bus stays split by domain (s2s/bus.py puts together s2s/bus_*.py), and what the
rest of the repo takes from ``s2s.bus`` is still there: every name it imports and every
attribute it uses on a bus object.  Reads source only: no Redis needed."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from .conftest import ROOT

#: a bus module that outgrows this does more than one job: split it again
MAX_LINES = 350
#: set on the instance in Bus.__init__, so not attributes of the class
INSTANCE_ATTRS = {"redis", "settings"}
SKIP_DIRS = {".git", ".venv", "build", "dist", "node_modules", "__pycache__"}
BUS_MODULES = sorted([ROOT / "s2s" / "bus.py", *(ROOT / "s2s").glob("bus_*.py")])


def repo_sources() -> list[tuple[Path, ast.Module]]:
    """Every Python file of the repo outside the bus itself, parsed."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if path in BUS_MODULES or any(part in SKIP_DIRS or part.startswith(".")
                                      or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        out.append((rel, ast.parse(path.read_text(encoding="utf-8"), str(rel))))
    return out


def package_of(rel: Path) -> list[str]:
    """The package a file belongs to once installed: s2s/ is ``s2s``, and every other
    top-level folder is mapped under it (pyproject's package-dir: gateway -> s2s.gateway)."""
    folders = list(rel.parts[:-1])
    return folders if folders[:1] == ["s2s"] else ["s2s", *folders]


def names_imported_from_bus(sources) -> dict[str, list[str]]:
    """name -> where it is imported, for each ``from s2s.bus import name`` (or the
    relative spelling of it)."""
    found: dict[str, list[str]] = {}
    for rel, tree in sources:
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package_of(rel)[:len(package_of(rel)) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module == "s2s.bus":
                for alias in node.names:
                    found.setdefault(alias.name, []).append(f"{rel}:{node.lineno}")
    return found


def attributes_used_on_a_bus(sources) -> dict[str, list[str]]:
    """attribute -> where, for each ``bus.attr`` / ``x.bus.attr`` / ``x._bus.attr``."""
    found: dict[str, list[str]] = {}
    for rel, tree in sources:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            if ((isinstance(owner, ast.Name) and owner.id in ("bus", "_bus"))
                    or (isinstance(owner, ast.Attribute) and owner.attr in ("bus", "_bus"))):
                found.setdefault(node.attr, []).append(f"{rel}:{node.lineno}")
    return found


def test_no_bus_module_does_everything():
    assert len(BUS_MODULES) > 1
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in BUS_MODULES}
    assert all(n <= MAX_LINES for n in sizes.values()), sizes


def test_every_name_imported_from_s2s_bus_resolves():
    bus = importlib.import_module("s2s.bus")
    imported = names_imported_from_bus(repo_sources())
    assert {"Bus", "REDIS_DOWN", "FIELD"} <= set(imported)  # the scan does find imports
    missing = {name: where for name, where in imported.items() if not hasattr(bus, name)}
    assert not missing, missing


def test_every_attribute_used_on_a_bus_exists():
    from s2s.bus import Bus
    used = attributes_used_on_a_bus(repo_sources())
    assert {"emit", "ack", "redis"} <= set(used)
    missing = {attr: where for attr, where in used.items()
               if attr not in INSTANCE_ATTRS and not hasattr(Bus, attr)}
    assert not missing, missing
