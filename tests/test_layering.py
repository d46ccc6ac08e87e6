"""The package's dependency direction (DESIGN.md §3), checked on every module's source.

``ranges <- spec <- plan/layout/target <- cache/adapter <- kernels <- transfer <-
sim/integrations/viz <- cli``: a module imports only modules of its own layer or below (eager,
lazy and type-checking imports alike), no two top-level modules import each other, the pure
modules never import torch, and every module imports on its own in a fresh interpreter.

The rules are data (:data:`LAYERS`, :data:`PURE`): a new module inside a listed package
(``transfer/``, ``kernels/`` ...) is covered automatically; a new top-level module fails
:func:`test_every_module_has_a_layer` until it is given a layer.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kvtriton"

#: Top-level modules / packages of kvtriton by layer, lowest first. ``kvtriton`` itself (the
#: package __init__) re-exports ranges/spec/plan/layout and sits with them.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"ranges", "table"}),
    frozenset({"spec"}),
    frozenset({"plan", "layout", "target", "hf", "options", "kvtriton"}),
    frozenset({"cache", "adapter"}),
    frozenset({"kernels"}),
    frozenset({"transfer"}),
    frozenset({"sim", "integrations", "viz", "testing"}),
    frozenset({"cli", "__main__"}),
)

#: Modules that never import torch (nor triton), even indirectly.
PURE: tuple[str, ...] = (
    "kvtriton",
    "kvtriton.ranges",
    "kvtriton.spec",
    "kvtriton.plan",
    "kvtriton.layout",
    "kvtriton.target",
    "kvtriton.table",
    "kvtriton.options",
)

#: Modules not imported by the isolation test (``python -m kvtriton`` runs the CLI on import).
NOT_IMPORTABLE = frozenset({"kvtriton.__main__"})


def _layer_of(component: str) -> int:
    for i, layer in enumerate(LAYERS):
        if component in layer:
            return i
    raise KeyError(component)


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


MODULES = dict(_modules())


def _component(module: str) -> str:
    """``kvtriton.cache.manager`` -> ``cache``; the package itself -> ``kvtriton``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kvtriton"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str) -> set[str]:
    """kvtriton modules ``module`` imports anywhere in its source (lazy and TYPE_CHECKING
    imports included); ``from kvtriton import x`` counts as ``kvtriton.x`` when x is a
    module, else as the package."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kvtriton")
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            if base.split(".")[0] != "kvtriton":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found


def test_every_module_has_a_layer() -> None:
    missing = sorted({_component(m) for m in MODULES} - set().union(*LAYERS))
    assert not missing, (
        f"top-level modules {missing} have no layer: add each to LAYERS in {Path(__file__).name}"
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    here = _component(module)
    level = _layer_of(here)
    upward = sorted(
        f"{target} (layer {_layer_of(_component(target))})"
        for target in _imports(module)
        if _layer_of(_component(target)) > level
    )
    assert not upward, f"{module} (layer {level}: {here}) imports upward: {upward}"


def test_no_two_top_level_modules_import_each_other() -> None:
    edges: dict[str, set[str]] = {}
    for module in MODULES:
        src = _component(module)
        for target in _imports(module):
            dst = _component(target)
            if dst != src and src != "kvtriton" and dst != "kvtriton":
                edges.setdefault(src, set()).add(dst)

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(c for c in edges if c in reachable(c))
    assert not cycles, f"import cycles through {cycles}: {edges}"


def test_sim_and_everything_below_never_import_the_cli() -> None:
    offenders = sorted(
        m
        for m in MODULES
        if _component(m) not in ("cli", "__main__")
        and any(_component(t) == "cli" for t in _imports(m))
    )
    assert not offenders, f"{offenders} import kvtriton.cli"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=PACKAGE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pure_modules_never_import_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {list(PURE)!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules)\n"
        "assert 'torch' not in heavy and 'triton' not in heavy, heavy\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr


def test_every_module_imports_on_its_own() -> None:
    """Each module, first in a fresh interpreter (a circular import fails only there).

    One interpreter imports torch and triton (the slow part) once, then forks a child per
    module; the child drops every kvtriton module and imports the one under test first.
    """
    names = sorted(set(MODULES) - NOT_IMPORTABLE)
    code = f"""
import importlib, os, sys, traceback
import torch, triton  # noqa: F401  (shared by the children; kvtriton is not imported)
failed = []
for name in {names!r}:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            os.write(w, traceback.format_exc().encode()[-2000:])
            os._exit(1)
    os.close(w)
    message = os.read(r, 4000).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(f"{{name}}: {{message}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
