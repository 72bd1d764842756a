"""The dependency rule of ARCHITECTURE.md and ``__all__`` in every public module, checked by ast.

The core (``functional, distributions -> posteriors, priors -> kl -> layers -> conv, likelihoods
-> elbo, moments -> predictive -> metrics, conjugate, convert``) never imports the outer ring
(``training``, ``data``, ``plots``, ``cli``), and within the core a module imports only modules
before it in that order. Imports are read from the source with :mod:`ast`, so lazy imports
inside functions count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "varlin"

#: Core modules by layer: a module may import core modules of a strictly lower layer only.
CORE_LAYERS = {
    "_validation": 0,
    "functional": 1,
    "distributions": 1,
    "_quadrature": 1,
    "posteriors": 2,
    "priors": 2,
    "kl": 3,
    # The one-node training step of a mean-field layer: functional's estimators, kl's sums.
    "_fused": 4,
    "layers": 5,
    "conv": 6,
    "likelihoods": 6,
    "elbo": 7,
    "moments": 7,
    # Below predictive and convert: its exact head (ExactLinear) is what the closed-form
    # predictive and bayesian_last_layer(method="exact") use; it needs only _validation.
    "conjugate": 7,
    "predictive": 8,
    "metrics": 9,
    "convert": 9,
}
OUTER_RING = {"training", "data", "plots", "cli"}
#: Third-party packages only the outer ring may use (optional extras).
OUTER_ONLY_PACKAGES = {"matplotlib"}


def _modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imports(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(varlin submodules imported, top-level third-party packages imported), anywhere in the file.

    Handles ``import varlin.x``, ``from varlin import x``, ``from varlin.x import y``,
    ``from . import x`` and ``from .x import y``.
    """
    internal: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "varlin":
                    if len(parts) > 1:
                        internal.add(parts[1])
                else:
                    external.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            parts = module.split(".") if module else []
            if node.level == 0 and parts and parts[0] != "varlin":
                external.add(parts[0])
                continue
            rest = parts[1:] if node.level == 0 else parts
            if rest:
                internal.add(rest[0])
            else:  # from varlin import x / from . import x: x may be a submodule
                internal.update(alias.name for alias in node.names)
    return internal, external


def test_the_rule_sees_every_import_form() -> None:
    """The checker itself: every import spelling of a submodule is recognised."""
    source = """
import varlin.training
from varlin import data as d
from varlin.plots import figure
from . import cli
from .kl import normal_kl
import matplotlib.pyplot as plt
def lazy():
    from .convert import to_variational
"""
    internal, external = _imports(ast.parse(source))
    assert internal == {"training", "data", "plots", "cli", "kl", "convert"}
    assert external == {"matplotlib"}


def _core_modules() -> list[str]:
    present = _modules()
    return [name for name in CORE_LAYERS if name in present]


def test_core_modules_exist() -> None:
    assert {"functional", "posteriors", "priors", "kl", "layers", "conjugate"} <= set(
        _core_modules()
    )


@pytest.mark.parametrize("name", _core_modules())
def test_core_never_imports_the_outer_ring(name: str) -> None:
    """Nor any other non-core module (``demo``, ``uci``, ...): those belong to the outer ring.

    A new private helper of the core must be added to ``CORE_LAYERS`` to be importable here.
    """
    internal, external = _imports(_tree(_modules()[name]))
    assert not internal & OUTER_RING, f"core module {name} imports {internal & OUTER_RING}"
    outside = internal - set(CORE_LAYERS)
    assert not outside, f"core module {name} imports non-core varlin modules {outside}"
    assert not external & OUTER_ONLY_PACKAGES, f"core module {name} imports {external}"


def test_outer_ring_is_not_core() -> None:
    assert not OUTER_RING & set(CORE_LAYERS)


@pytest.mark.parametrize("name", _core_modules())
def test_core_imports_only_lower_layers(name: str) -> None:
    internal, _ = _imports(_tree(_modules()[name]))
    upward = {
        other
        for other in internal & set(CORE_LAYERS)
        if CORE_LAYERS[other] >= CORE_LAYERS[name] and other != name
    }
    assert not upward, f"{name} (layer {CORE_LAYERS[name]}) imports same/higher layer {upward}"


def _public_modules() -> list[str]:
    return [name for name in _modules() if not name.startswith("_") or name == "__init__"]


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()

    def bind(target: ast.AST) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                names.add(node.id)

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                bind(target)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            bind(node.target)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)):
            # e.g. TYPE_CHECKING blocks or optional imports: bindings one level down
            inner = ast.Module(body=list(ast.iter_child_nodes(node)), type_ignores=[])
            names |= _top_level_names(inner)  # type: ignore[arg-type]
    return names


def _dunder_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            value = node.value  # type: ignore[union-attr]
            if not isinstance(value, (ast.List, ast.Tuple)):
                raise AssertionError("__all__ must be a literal list or tuple of strings")
            items = []
            for element in value.elts:
                if not (isinstance(element, ast.Constant) and isinstance(element.value, str)):
                    raise AssertionError(f"__all__ entry {ast.dump(element)} is not a string")
                items.append(element.value)
            return items
    return None


@pytest.mark.parametrize("name", _public_modules())
def test_public_module_has_all_of_defined_names(name: str) -> None:
    tree = _tree(_modules()[name])
    exported = _dunder_all(tree)
    assert exported is not None, f"varlin/{name}.py has no __all__"
    assert exported, f"varlin/{name}.py has an empty __all__"
    assert len(exported) == len(set(exported)), f"duplicates in {name}.__all__"
    defined = _top_level_names(tree)
    missing = [item for item in exported if item not in defined and item != "__version__"]
    assert not missing, f"{name}.__all__ names undefined {missing}"


def test_package_all_resolves() -> None:
    import varlin

    for item in varlin.__all__:
        assert hasattr(varlin, item), item
    for name in ("LinearVariationalNormal", "VariationalLinear", "kl_divergence", "deterministic"):
        assert name in varlin.__all__


def test_import_varlin_does_not_need_the_plots_extra() -> None:
    """``import varlin`` must not import matplotlib (an optional extra, imported lazily)."""
    code = "import sys, varlin; sys.exit('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]


def _dynamic_imports(tree: ast.Module) -> set[str]:
    """varlin submodules named in ``importlib.import_module("varlin.x")`` calls."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            parts = node.args[0].value.split(".")
            if parts[0] == "varlin" and len(parts) > 1:
                found.add(parts[1])
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the varlin modules it imports, statically, lazily or through importlib."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = _tree(path)
        internal = _imports(tree)[0] | _dynamic_imports(tree)
        graph[name] = {m for m in internal if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_the_cycle_check_finds_cycles_and_importlib_imports() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse('importlib.import_module("varlin.uci")\nimportlib.import_module("os")')
    assert _dynamic_imports(tree) == {"uci"}


def test_no_module_imports_one_that_imports_it_back() -> None:
    """No import circle anywhere in the package, lazy and importlib imports included: shared
    pieces (errors, checkpoints) live below every module that uses them."""
    graph = _import_graph()
    assert {"cli", "uci", "training", "loop", "ensemble"} <= set(graph)
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])
