"""The package's imports point one way: kernels <- ops <- config <- model / pack / generate /
checkpoint <- application, with layout, backend, schedules and aot below them all, and the scalar
argument checks (checks.py) below those.

The graph is read from the ``import`` statements of every module of ``transfusion_fast`` (the
kernels included), those inside functions too, so a lazy import cannot hide a cycle.
"""
import ast
import importlib.util
from pathlib import Path

import pytest

# Lowest first: a module may import modules of its own layer or of a lower one, never higher.
LAYERS = [
    ("checks", ("transfusion_fast.checks",)),
    ("base", ("transfusion_fast._compat", "transfusion_fast._ext", "transfusion_fast.backend",
              "transfusion_fast.layout", "transfusion_fast.schedules", "transfusion_fast.aot")),
    ("kernels", ("transfusion_fast.kernels",)),
    ("ops", ("transfusion_fast.ops",)),
    ("config", ("transfusion_fast.config", "transfusion_fast.hf_weights")),
    ("model", ("transfusion_fast.pack", "transfusion_fast.generate", "transfusion_fast.model",
               "transfusion_fast.checkpoint", "transfusion_fast.testing", "transfusion_fast.hf",
               "transfusion_fast.encoders", "transfusion_fast.codec", "transfusion_fast.ema")),
    ("package", ("transfusion_fast",)),
    ("application", ("transfusion_fast.app", "transfusion_fast.__main__")),
]
#: (importer, imported) pairs that the layers allow but the design does not
FORBIDDEN = [("transfusion_fast.pack", "transfusion_fast.model"),      # pack needs the config only
             ("transfusion_fast.generate", "transfusion_fast.model")]  # Model.generate calls generate


def _modules() -> dict:
    """module name -> source path, for every module of the package and of its kernels."""
    found = {}
    for package in ("transfusion_fast", "transfusion_fast.kernels"):
        for root in importlib.util.find_spec(package).submodule_search_locations:
            for path in Path(root).rglob("*.py"):
                parts = path.relative_to(root).with_suffix("").parts
                if package == "transfusion_fast" and parts[0] == "kernels":
                    continue
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact = prefix in ("transfusion_fast",)
            if module == prefix or (not exact and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def _imports(module: str) -> list:
    """(imported module, imported private name or None, line) of every import in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in MODULES:
                    found.append((target, None, node.lineno))
                else:
                    found.append((base, alias.name if alias.name.startswith("_") else None, node.lineno))
    return [(target, private, line) for target, private, line in found if target in MODULES]


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_is_in_a_layer_and_the_graph_is_complete():
    for module in MODULES:
        _layer(module)
    assert {"transfusion_fast.kernels.attention", "transfusion_fast.ops.attention", "transfusion_fast.config",
            "transfusion_fast.generate", "transfusion_fast.app.cli"} <= set(MODULES)
    # the graph sees imports inside functions as well as at the top
    assert ("transfusion_fast.kernels.attention_tiles", None) in {
        (target, private) for target, private, _ in GRAPH["transfusion_fast.kernels.attention"]}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    rank = _layer(module)
    for target, _, line in GRAPH[module]:
        assert _layer(target) <= rank, (f"{module}:{line} imports {target}: layer "
                                        f"{LAYERS[_layer(target)][0]} is above {LAYERS[rank][0]}")
        assert (module, target) not in FORBIDDEN, f"{module}:{line} imports {target}"


def test_no_private_name_crosses_a_module():
    crossing = [(module, line, f"{target}.{private}") for module, edges in GRAPH.items()
                for target, private, line in edges if private is not None and target != module]
    assert not crossing, crossing


def test_the_import_graph_is_acyclic():
    state: dict = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(path + [module])
        state[module] = "open"
        for target, _, _ in GRAPH[module]:
            if target != module:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(GRAPH):
        visit(module, [])
