"""Which way imports run (DESIGN.md; issue 13, point 5), checked on the source with ``ast``.

Every ``import`` and ``from ... import`` under ``fedfm/`` counts -- module level,
inside functions and under ``if TYPE_CHECKING:`` alike; relative imports are
resolved. ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg``. Importing ``a.b.c`` is an edge to ``a.b.c`` only (not
to the parent packages that Python also runs).

The test fails on
* a module that :data:`LAYERS` does not place (place new modules deliberately);
* an import of a higher layer, or one that :data:`FORBIDDEN` rules out within
  the component layer, unless listed in :data:`KNOWN_VIOLATIONS`;
* an import cycle between fedfm modules, unless listed in :data:`KNOWN_CYCLES`;
* an entry of either known list that no longer occurs (so the lists cannot rot).
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fedfm"

# Top to bottom. A module may import its own layer or any lower one, never a higher one.
# Each layer maps groups to module names: "fedfm.x" covers fedfm.x and everything under it,
# "fedfm.x.__init__" only the package fedfm.x itself (fedfm/x/__init__.py), so "fedfm.__init__"
# places the package's entry point without placing every module under fedfm. The longest match
# wins. Groups name what FORBIDDEN talks about. A module no entry covers fails the test.
LAYERS: list[tuple[str, dict[str, tuple[str, ...]]]] = [
    # fedfm.__main__ only calls the CLI (``python -m fedfm``): an entry point, so it sits with the CLI
    ("cli", {"cli": ("fedfm.cli", "fedfm.__main__")}),
    # deployment on Flower: drives the run layer's loop from a ServerApp, the client side from a node
    ("deploy", {"deploy": ("fedfm.deploy",)}),
    ("run", {"run": ("fedfm.runner", "fedfm.build", "fedfm.__init__")}),
    ("drivers", {"drivers": ("fedfm.drivers",)}),
    ("server/client", {"server": ("fedfm.server",), "client": ("fedfm.client",)}),
    ("components", {
        "algorithms": ("fedfm.algorithms",),
        "privacy": ("fedfm.privacy",),
        "robustness": ("fedfm.robustness",),
        "compression": ("fedfm.compression",),
        "models": ("fedfm.models",),
        "data": ("fedfm.data",),
        "eval": ("fedfm.eval",),
        "personalization": ("fedfm.personalization",),
        "continual": ("fedfm.continual",),
    }),
    ("config", {"config": ("fedfm.config",)}),
    # fedfm.run_folder: the run folder's lock and run id (stdlib only; the checkpoints read the run id)
    ("bottom", {"bottom": ("fedfm.errors", "fedfm.registry", "fedfm.seeds", "fedfm.tensor_groups",
                           "fedfm.run_folder")}),
]

# Within the component layer (DESIGN.md): group -> groups it never imports.
FORBIDDEN: dict[str, set[str]] = {
    "models": {"algorithms", "privacy", "robustness", "compression", "personalization", "continual"},
    "data": {"algorithms", "privacy", "robustness", "compression", "personalization", "continual"},
    "algorithms": {"privacy", "robustness", "compression", "personalization", "continual"},
}

# Imports that run the wrong way, as (importer, imported). Issue 13 emptied it: keep it empty
# (move the code where it belongs instead of listing an exception).
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()

# Import cycles today, each as the sorted modules of one strongly connected component.
# Issue 13: this set must stay empty; never add to it.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


# -- the checker ----------------------------------------------------------------------


def module_name(path: str) -> tuple[str, bool]:
    """``fedfm/a/b.py`` -> ("fedfm.a.b", False); ``fedfm/a/__init__.py`` -> ("fedfm.a", True)."""
    parts = list(Path(path).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None]]:
    """(module, name or None) for every import in ``tree``, relative ones made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.extend((target, alias.name) for alias in node.names)
    return out


def import_graph(sources: dict[str, str], package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the ``package`` modules it imports, from ``{path: source}``."""
    parsed = {}
    for path, source in sources.items():
        name, is_package = module_name(path)
        parsed[name] = (ast.parse(source, filename=path), is_package)
    known = set(parsed)

    def existing(target: str) -> str | None:
        while target and target not in known:  # a missing submodule: its nearest existing package
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, set[str]] = {name: set() for name in parsed}
    for name, (tree, is_package) in parsed.items():
        for target, attr in _imported_names(tree, name, is_package):
            if target != package and not target.startswith(package + "."):
                continue
            full = f"{target}.{attr}" if attr and attr != "*" else target
            dest = full if full in known else existing(target)
            if dest and dest != name:
                graph[name].add(dest)
    return graph


def place(module: str, layers=LAYERS) -> tuple[int, str, str] | None:
    """(layer index, layer name, group) of ``module`` by its longest matching entry, or None when unplaced."""
    best = None
    for index, (layer, groups) in enumerate(layers):
        for group, names in groups.items():
            for name in names:
                if name.endswith(".__init__"):
                    hit = module == name[: -len(".__init__")]
                else:
                    hit = module == name or module.startswith(name + ".")
                if hit and (best is None or len(name) > best[0]):
                    best = (len(name), (index, layer, group))
    return best[1] if best else None


def violations(graph: dict[str, set[str]], layers=LAYERS, forbidden=FORBIDDEN) -> dict[tuple[str, str], str]:
    """(importer, imported) -> why, for every import that runs against ``layers`` or ``forbidden``."""
    out = {}
    for importer, targets in graph.items():
        src = place(importer, layers)
        if src is None:
            continue  # reported by unplaced()
        for imported in targets:
            dst = place(imported, layers)
            if dst is None:
                continue
            if dst[0] < src[0]:
                out[(importer, imported)] = f"{src[1]} layer imports the higher {dst[1]} layer"
            elif dst[0] == src[0] and dst[2] in forbidden.get(src[2], ()):
                out[(importer, imported)] = f"{src[2]} never imports {dst[2]} (DESIGN.md)"
    return out


def unplaced(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """The modules that no layer covers."""
    return sorted(m for m in graph if place(m, layers) is None)


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    found.append(sorted(component))
    return found


def _chain(graph: dict[str, set[str]], members: list[str]) -> str:
    """A shortest cycle through the first member, as ``a -> b -> a``."""
    inside = set(members)
    start = members[0]
    parent = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & inside):
            if child == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return " -> ".join([*reversed(path), start])
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def cycles(graph: dict[str, set[str]]) -> dict[tuple[str, ...], str]:
    """Each import cycle (the sorted modules of a strongly connected component) -> a readable chain."""
    return {tuple(c): _chain(graph, c) for c in _components(graph) if len(c) > 1}


def read_sources(root: Path = ROOT, package: str = PACKAGE) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted((root / package).rglob("*.py"))}


# -- the tests ------------------------------------------------------------------------


def test_import_layers_and_cycles():
    graph = import_graph(read_sources())
    assert len(graph) > 50, "fedfm's modules were not found"
    problems = []

    missing = unplaced(graph)
    if missing:
        problems.append("modules no layer places (add them to LAYERS in tests/test_layers.py): " + ", ".join(missing))

    found = violations(graph)
    for pair in sorted(found.keys() - KNOWN_VIOLATIONS):
        problems.append(f"upward import {pair[0]} -> {pair[1]}: {found[pair]}")
    for pair in sorted(KNOWN_VIOLATIONS - found.keys()):
        problems.append(f"KNOWN_VIOLATIONS entry {pair} no longer occurs: remove it")

    loops = cycles(graph)
    for key in sorted(loops.keys() - KNOWN_CYCLES):
        problems.append(f"import cycle {loops[key]} (modules in the cycle: {', '.join(key)})")
    for key in sorted(KNOWN_CYCLES - loops.keys()):
        problems.append(f"KNOWN_CYCLES entry {key} no longer occurs: remove it (or update it to the cycle left)")

    assert not problems, "\n".join(problems)


def test_layer_map_places_every_module_once():
    """A prefix in two places would make the map ambiguous."""
    prefixes = [p for _, groups in LAYERS for ps in groups.values() for p in ps]
    assert len(prefixes) == len(set(prefixes))
    assert place("fedfm")[1] == "run"  # fedfm/__init__.py, by "fedfm.__init__" only
    assert place("fedfm.not_yet_placed") is None
    assert place("fedfm.drivers.continual")[1] == "drivers"
    assert place("fedfm.continual.replay")[2] == "continual"
    assert place("fedfm.compression.wire")[2] == "compression"
    assert set(FORBIDDEN) | {g for gs in FORBIDDEN.values() for g in gs} <= {
        g for _, groups in LAYERS for g in groups
    }


SYNTHETIC_LAYERS = [
    ("top", {"top": ("pkg.top",)}),
    ("mid", {"alg": ("pkg.alg",), "models": ("pkg.models",), "priv": ("pkg.priv",)}),
    ("bottom", {"bottom": ("pkg.util",)}),
]
SYNTHETIC_FORBIDDEN = {"models": {"alg", "priv"}}
SYNTHETIC = {
    "pkg/__init__.py": "",
    "pkg/top.py": "import pkg.util\n",
    "pkg/alg/__init__.py": "from .core import step\n",  # pkg.alg.core: a module
    "pkg/alg/core.py": (
        "import os\n"
        "from pkg.util import helper\n"
        "def step():\n"
        "    from ..models import make  # function-level, relative; make is a name in pkg.models\n"
        "    return make\n"
    ),
    "pkg/models/__init__.py": "from pkg.models.build import make\n",
    "pkg/models/build.py": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.priv import noise\n"
        "def make():\n"
        "    import pkg.alg.core  # closes a cycle alg.core -> models -> models.build -> alg.core\n"
    ),
    "pkg/priv.py": "def noise():\n    from pkg.top import main  # upward, in a function\n",
    "pkg/util.py": "def helper(): ...\n",
    "pkg/stray.py": "import pkg.util\n",
}


def test_checker_finds_cycles_upward_imports_and_unplaced_modules():
    graph = import_graph(SYNTHETIC, package="pkg")
    assert graph["pkg.alg"] == {"pkg.alg.core"}
    assert graph["pkg.alg.core"] == {"pkg.util", "pkg.models"}  # relative, in a function; os ignored
    assert graph["pkg.top"] == {"pkg.util"}

    found = violations(graph, SYNTHETIC_LAYERS, SYNTHETIC_FORBIDDEN)
    assert found.keys() == {
        ("pkg.priv", "pkg.top"),  # mid imports top
        ("pkg.models.build", "pkg.alg.core"),  # same layer, forbidden group
        ("pkg.models.build", "pkg.priv"),  # under TYPE_CHECKING still counts
    }
    assert found[("pkg.priv", "pkg.top")] == "mid layer imports the higher top layer"
    assert found[("pkg.models.build", "pkg.alg.core")] == "models never imports alg (DESIGN.md)"

    loops = cycles(graph)
    assert set(loops) == {("pkg.alg.core", "pkg.models", "pkg.models.build")}
    assert loops[("pkg.alg.core", "pkg.models", "pkg.models.build")] == (
        "pkg.alg.core -> pkg.models -> pkg.models.build -> pkg.alg.core"
    )
    assert unplaced(graph, SYNTHETIC_LAYERS) == ["pkg", "pkg.stray"]


def test_checker_resolves_from_package_import_of_a_submodule_into_a_cycle():
    graph = import_graph(
        {"pkg/a.py": "import pkg.b\n", "pkg/b.py": "def f():\n    from pkg import a\n", "pkg/__init__.py": ""},
        package="pkg",
    )
    assert cycles(graph) == {("pkg.a", "pkg.b"): "pkg.a -> pkg.b -> pkg.a"}


def test_no_function_in_fedfm_is_over_sixty_lines():
    """Issue 13's size target: a function that grows past a screen gets split where it has parts."""
    long = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "functions over 60 lines: " + ", ".join(long)
