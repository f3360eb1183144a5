"""The layout shows the layers, and the import graph keeps them apart (STYLE.md).

Every ``import`` in the package, module-level or inside a function, is read with ``ast``
(nothing is imported), and each layer may reach only what it stands on: the sans-I/O wire
knows no trio and nothing of jobs; a job's parts know nothing of the wire; the host's
mechanisms know nothing of jobs; the trio client knows nothing of the server side.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trio_worker"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved (``from . import x`` as
    ``pkg.x`` too, since x may be a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py") if "_pb" not in p.parts}


def _reaches(imports: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(i for i in imports if any(i == p or i.startswith(p + ".") for p in prefixes))


#: (modules under this prefix, what they must never import)
RULES = [
    (
        "trio_worker._wire",
        (
            "trio",
            "anyio",
            "socket",
            "ssl",
            "trio_worker._net",
            "trio_worker._jobs",
            "trio_worker._host",
            "trio_worker.server",
            "trio_worker.client",
            "trio_worker.cli",
        ),
    ),
    (
        "trio_worker._host",
        (
            "trio_worker._jobs",
            "trio_worker._wire",
            "trio_worker._net",
            "trio_worker.server",
            "trio_worker.client",
            "trio_worker.cli",
            "trio_worker._pb",
        ),
    ),
    (
        "trio_worker._jobs",
        (
            "trio_worker._wire",
            "trio_worker._net",
            "trio_worker.server",
            "trio_worker.client",
            "trio_worker.cli",
            "trio_worker._pb",
            "trio_worker._convert",
            "purerpc",
            "h2",
        ),
    ),
    (
        "trio_worker.client",
        (
            "trio_worker._jobs",
            "trio_worker._host",
            "trio_worker.server",
            "trio_worker._net._transport",
        ),
    ),
    (
        "trio_worker._net._channel",
        (
            "trio_worker._jobs",
            "trio_worker._host",
            "trio_worker.server",
            "trio_worker._net._transport",
        ),
    ),
    (
        "trio_worker._net._blocking",
        (
            "trio",
            "anyio",
            "purerpc",
            "trio_worker._jobs",
            "trio_worker._host",
            "trio_worker.server",
        ),
    ),
]


@pytest.mark.parametrize(("layer", "banned"), RULES, ids=[rule[0] for rule in RULES])
def test_each_layer_imports_only_what_it_stands_on(layer: str, banned: tuple[str, ...]) -> None:
    members = {m: i for m, i in MODULES.items() if m == layer or m.startswith(layer + ".")}
    assert members, f"no module under {layer}: the layout changed, update the rules"
    wrong = {m: _reaches(i, banned) for m, i in members.items() if _reaches(i, banned)}
    assert wrong == {}


def test_no_import_circle_among_the_hosts_mechanisms() -> None:
    """One place decides what a host can enforce (``_host/_enforce``): the cgroup driver
    and the namespaces helper do not import each other."""
    host = {m: i for m, i in MODULES.items() if m.startswith("trio_worker._host.")}

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for target in host.get(todo.pop(), set()):
                if target in host and target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    circles = sorted(m for m in host if m in reach(m))
    assert circles == []
