"""The package's layers: imports point down only, and no import hides inside a function.

``app -> training -> objective -> tasks -> core``, with ``model`` and ``data`` beside
``tasks`` (they read only ``core`` and ``config``), and ``config`` at the root; the Kendall
aggregate (``core/aggregate.py``) reads its section of the configuration, the rest of
``core`` nothing above it.
"""

import ast
import functools
import gc
import os

import han_jax

ROOT = os.path.dirname(han_jax.__file__)
# Each layer may import the layers after it in this order (and itself), never one before it.
ORDER = ("launch", "cli", "app", "training", "objective", "tasks", "model", "data", "testing", "core.aggregate",
         "config", "core")
# Lower layers that do not read each other.
APART = {("tasks", "model"), ("tasks", "data"), ("model", "data"), ("data", "model"), ("tasks", "testing"),
         ("model", "testing"), ("data", "testing"), ("testing", "data"), ("testing", "model")}


def _layer(module: str) -> str:
    if module == "han_jax.core.aggregate":
        return "core.aggregate"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@functools.lru_cache(maxsize=1)
def _parsed() -> tuple:
    """``(module, ast)`` of every module of the package, parsed once for all the tests here."""
    # CPython 3.11 counts the AST constructor's recursion depth in a global: a garbage collection inside
    # ast.parse that formats a traceback (an orbax task's exception never retrieved, collected here) parses
    # again and trips "AST constructor recursion depth mismatch". Collect once, then parse with gc off.
    gc.collect()
    gc.disable()
    try:
        out = []
        for folder, _, files in os.walk(ROOT):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                    with open(path) as handle:
                        out.append((rel.removesuffix(".__init__"), ast.parse(handle.read())))
        return tuple(out)
    finally:
        gc.enable()


def _modules():
    return iter(_parsed())


def _han_jax_imports(tree):
    """(node, imported module, inside a function) for every import of a han_jax module."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("han_jax"):
                yield child, child.module, inner
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("han_jax"):
                        yield child, alias.name, inner
            yield from visit(child, inner)

    yield from visit(tree, False)


def test_imports_point_down_the_layers():
    wrong = []
    for module, tree in _modules():
        here = _layer(module)
        if here == "__init__":
            continue
        for node, imported, _ in _han_jax_imports(tree):
            there = _layer(imported)
            if there in ("__init__", here):
                continue
            up = ORDER.index(there) < ORDER.index(here)
            if up or (here, there) in APART:
                wrong.append(f"{module}:{node.lineno} imports {imported}")
    assert not wrong, "\n".join(wrong)


# The command's launcher imports the CLI, and with it JAX, only once it has chosen the process's heap (it may
# re-execute the process instead): the one deferred import, and it hides no circle (launch is the top layer).
DEFERRED = {"han_jax.launch"}


def test_no_han_jax_import_inside_a_function():
    """An import inside a function hides a circle; the layers above have none to hide."""
    inside = [f"{module}:{node.lineno} imports {imported}" for module, tree in _modules()
              for node, imported, in_function in _han_jax_imports(tree) if in_function and module not in DEFERRED]
    assert not inside, "\n".join(inside)


def test_every_folder_says_what_it_owns():
    for folder in ("core", "tasks", "training", "app", "model", "data"):
        assert os.path.exists(os.path.join(ROOT, folder, "README.md")), folder
