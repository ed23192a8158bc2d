"""The layer rule, checked on every module of dpool/: imports point down.

Bottom to top (a module may import its own layer and the ones below)::

    errors, config, hosts, records
    transport
    protocol, serialize, liveness
    node
    core
    futures, pool, _adapters, dispy,     (the APIs, what they share,
    progressbar, joblib, dashboard,       and what builds on them)
    httpd
    daemons
    dpool/__init__.py

Every import counts, the ones inside functions (which hide cycles) and
under ``if TYPE_CHECKING:`` included.  A new module goes in the layer of its
package; a new top-level module must be added to LAYERS below.
"""
import ast
import pathlib

import pytest

import dpool

ROOT = pathlib.Path(dpool.__file__).resolve().parent

LAYERS = [
    ("dpool.errors", "dpool.config", "dpool.hosts", "dpool.records"),
    ("dpool.transport",),
    ("dpool.protocol", "dpool.serialize", "dpool.liveness"),
    ("dpool.node",),
    ("dpool.core",),
    ("dpool.futures", "dpool.pool", "dpool._adapters", "dpool.dispy", "dpool.progressbar",
     "dpool.joblib", "dpool.dashboard", "dpool.httpd"),
    ("dpool.daemons",),
    ("dpool",),
]
RANK = {prefix: rank for rank, prefixes in enumerate(LAYERS) for prefix in prefixes}


def layer(module):
    """The rank of ``module`` (a dotted name under dpool): its longest
    prefix in LAYERS; None for a module in no layer."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in RANK:
            return RANK[prefix] if n > 1 or module == "dpool" else None
    return None


def module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name):
    """True if ``name`` (dotted, under dpool) is a module or package of ours."""
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(module, tree, is_package):
    """(line, dotted name) of every dpool module ``module``'s ``tree`` imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                name = f"{source}.{alias.name}"
                yield node.lineno, name if is_module(name) else source


def violations(module, source, is_package=False):
    """Each import in ``source`` (the text of ``module``) that points up a
    layer, or at or from a module in no layer, as a readable line."""
    own = layer(module)
    if own is None:
        return [f"{module} is in no layer: add it to LAYERS in {__file__}"]
    found = []
    for line, target in imported(module, ast.parse(source), is_package):
        if target != "dpool" and not target.startswith("dpool."):
            continue
        rank = layer(target)
        if rank is None:
            found.append(f"{module}:{line} imports {target}, which is in no layer")
        elif rank > own:
            found.append(f"{module}:{line} imports {target}: up from "
                         f"{LAYERS[own]} to {LAYERS[rank]}")
    return found


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down_the_layers(path):
    assert violations(module_name(path), path.read_text(), path.name == "__init__.py") == []


def test_the_check_sees_imports_inside_functions():
    source = "def f():\n    from .transport.netaddr import interface_addresses\n"
    (problem,) = violations("dpool.config", source)
    assert problem.startswith("dpool.config:2 imports dpool.transport.netaddr: up")


@pytest.mark.parametrize("module, source, is_package", [
    ("dpool.core.client", "from ..dispy import model", False),
    ("dpool.core", "from ..futures import Executor", True),
    ("dpool.node.env.job", "from ...core.client import Client", False),
    ("dpool.transport.tcp", "import dpool.protocol as P", False),
    ("dpool.serialize", "from dpool import pool", False),
    ("dpool.pool", "from .daemons import node", False),
])
def test_the_check_sees_upward_imports(module, source, is_package):
    assert len(violations(module, source, is_package)) == 1


@pytest.mark.parametrize("module, source, is_package", [
    ("dpool.core.client", "from ..node.runtime import NodeRuntime", False),
    ("dpool.core", "from .client import Client", True),
    ("dpool.dispy.cluster", "from .. import config, serialize", False),
    ("dpool.node.env.job", "from ... import protocol as P", False),
    ("dpool", "from .dispy.cluster import JobCluster", True),
])
def test_the_check_lets_downward_imports_pass(module, source, is_package):
    assert violations(module, source, is_package) == []


def test_every_module_is_checked():
    names = {module_name(path) for path in MODULES}
    assert {"dpool", "dpool.config", "dpool.transport.tcp", "dpool.core.client",
            "dpool.node.env.job", "dpool.dispy.cluster", "dpool.daemons.node"} <= names
