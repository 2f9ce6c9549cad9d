"""The layout rules, checked on the static import graph (AST, nothing is imported).

Every module under rentalml/ (the core), components/, pipelines/, inference/ and streaming/ (the deployables,
installed as rentalml.components etc.) is parsed; every `import` / `from … import` anywhere in it (module level
or inside a function: a lazy import is still a dependency) is an edge, except those under
`if TYPE_CHECKING:` (annotations only). A `from pkg import name` where pkg.name is a module is an edge to that
module; importing a module does not add an edge to its parent package.

Rules (README "Layout", docs/architecture.md):
  (a) the graph has no cycle;
  (b) the core never imports a deployable, and a deployable never imports another one, except a pipeline
      importing its components.
The same rules as import-linter's "independence" and "layers" contracts, without the dependency.

KNOWN_* list today's violations that other work is removing, each with why; an edge fixed must leave its
list (test_allow_lists_are_current fails on a stale entry), and nothing new may join them.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it is installed as
PACKAGES = {"rentalml": "rentalml", "components": "rentalml.components", "pipelines": "rentalml.pipelines",
            "inference": "rentalml.inference", "streaming": "rentalml.streaming"}
DEPLOYABLES = ("rentalml.components", "rentalml.pipelines", "rentalml.inference", "rentalml.streaming")
#: (importer, imported) pairs allowed across deployables
ALLOWED_CROSS = {("rentalml.pipelines", "rentalml.components")}

#: (importer module, imported module) edges that break rule (b) today
KNOWN_LAYER_VIOLATIONS: set[tuple[str, str]] = set()
# Removed (issue 12, data-plane contracts in the core): inference.freshness -> streaming.state (now
# rentalml.state), inference.outcomes / inference.cli -> streaming.kafka_io (now rentalml.kafka),
# inference.cli -> components.deploy (InferenceService patching is rentalml.kserve).

#: edges that close a cycle today (dropping them leaves the graph acyclic)
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()
# Removed (issue 12, KServe-shaped inference/): inference.model -> inference.server (a spawned REST worker runs
# the server's worker_init through the model's `worker_init` attribute, a function pickled by name).


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package)"""
    mods: dict[str, tuple[Path, bool]] = {}
    for folder, pkg in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder)
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts[:-1]):
                continue
            parts = list(rel.with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = (f, is_pkg)
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes outside `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            stack.append(child)


def _canonical(name: str) -> str:
    """A top-level deployable name (`inference.x`, as the tests' rootdir allows) as the installed package."""
    head, _, rest = name.partition(".")
    if head in PACKAGES and head != "rentalml":
        return PACKAGES[head] + ("." + rest if rest else "")
    return name


@cache
def graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        """The module `name` is, or the closest enclosing module of ours (None: not ours)."""
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [_canonical(a.name) for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = _canonical(node.module or "")
                # `from pkg import sub` imports the module pkg.sub where there is one, else a name of pkg
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for t in targets:
                r = resolve(t)
                if r is not None and r != mod:
                    edges[mod].add(r)
    return edges


def _layer(mod: str) -> str:
    for d in DEPLOYABLES:
        if mod == d or mod.startswith(d + "."):
            return d
    return "core"


def layer_violations(g: dict[str, set[str]] | None = None) -> set[tuple[str, str]]:
    out = set()
    for a, targets in (graph() if g is None else g).items():
        for b in targets:
            la, lb = _layer(a), _layer(b)
            if la == lb or lb == "core" or (la, lb) in ALLOWED_CROSS:
                continue
            out.add((a, b))
    return out


def cycles(ignore: set[tuple[str, str]] = frozenset(), g: dict[str, set[str]] | None = None) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), after dropping `ignore` edges."""
    g = {a: sorted(b for b in bs if (a, b) not in ignore) for a, bs in (graph() if g is None else g).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(g[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(g[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


# ------------------------------------------------------------------------------------------------- tests
def test_the_walker_sees_every_part():
    """Guards the test itself: every folder is walked and known edges are found."""
    g = graph()
    for pkg in PACKAGES.values():
        assert pkg in g, pkg
    assert len(g) > 80
    assert "rentalml.state" in g["rentalml.streaming.processor"]  # from rentalml.state import …
    assert "rentalml.kafka" in g["rentalml.inference.outcomes"]  # a module-level import
    assert "rentalml.streaming.validate" in g["rentalml.streaming.processor"]  # a relative import
    # a crafted violation is reported
    crafted = {a: set(bs) for a, bs in g.items()}
    crafted["rentalml.config"].add("rentalml.inference.server")
    assert ("rentalml.config", "rentalml.inference.server") in layer_violations(crafted)
    crafted["rentalml.inference.server"].add("rentalml.config")
    assert any({"rentalml.config", "rentalml.inference.server"} <= set(c) for c in cycles(g=crafted))


def test_no_deployable_imports_another_and_the_core_imports_none():
    bad = layer_violations() - KNOWN_LAYER_VIOLATIONS
    assert not bad, "layout rule broken (core -> deployable or deployable -> deployable):\n" + \
        "\n".join(f"  {a} -> {b}" for a, b in sorted(bad))


def test_no_import_cycle():
    found = cycles(ignore=KNOWN_CYCLE_EDGES)
    assert not found, "import cycles:\n" + "\n".join("  " + " <-> ".join(c) for c in found)


def test_allow_lists_are_current():
    """An allow-listed edge that no longer exists must leave the list (so it cannot come back unnoticed)."""
    g = graph()
    stale = sorted(e for e in KNOWN_LAYER_VIOLATIONS | KNOWN_CYCLE_EDGES if e[1] not in g.get(e[0], ()))
    assert not stale, f"fixed, remove from the allow-list: {stale}"
    # and every cycle edge listed is still needed to break a cycle
    for e in sorted(KNOWN_CYCLE_EDGES):
        assert cycles(ignore=KNOWN_CYCLE_EDGES - {e}), f"{e} no longer closes a cycle: remove it from the list"
