"""The package's layers hold: imports flow downwards, no cycles, no private names across
modules, short files, and the module paths of 0.1.0 still import (with a warning)."""

import ast
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edm_fast"

# Lowest first. A module may import its own layer and the layers before it.
LAYERS = [
    {"core"}, {"nets", "kernels"}, {"io"}, {"sampling"}, {"train"}, {"eval"}, {"serve", "cli"},
]
MAX_TOP_LEVEL_MODULES = 12
MAX_LINES = 600


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("edm_fast", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = (path, ast.parse(path.read_text()))
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[1:] == ["__main__"]:
        group = "cli"  # python -m edm_fast
    elif len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
        group = parts[1]
    else:
        group = "core"
    return next(i for i, layer in enumerate(LAYERS) if group in layer)


def _imports(module: str) -> list[tuple[str, str]]:
    """(imported module, imported name or '') for every edm_fast import in ``module``."""
    path, tree = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:
                    found.append((full, ""))
                elif base in MODULES:
                    found.append((base, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name in MODULES]
    return [(target, name) for target, name in found if target != module]


def test_imports_flow_downwards():
    upward = [f"{m} imports {t}" for m in MODULES for t, _ in _imports(m)
              if m != "edm_fast" and _layer(t) > _layer(m)]
    assert not upward


def test_no_private_names_across_modules():
    private = [f"{m} imports {t}.{n}" for m in MODULES for t, n in _imports(m)
               if n.startswith("_") and not n.startswith("__")]
    assert not private


def test_no_import_cycles():
    edges = {m: {t for t, _ in _imports(m)
                 if not (MODULES[t][0].name == "__init__.py" and m.startswith(t + "."))}
             for m in MODULES}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif not state.get(nxt):
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(MODULES):
        if not state.get(m):
            visit(m, [])
    assert not cycles


def test_few_top_level_modules_and_short_files():
    top = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, sorted(top)
    long = [f"{p} ({n} lines)" for p, _ in MODULES.values()
            if (n := p.read_text().count("\n")) > MAX_LINES]
    assert not long


@pytest.mark.parametrize("old, new, name", [
    ("edm_fast.samplers", "edm_fast.sampling.reference", "sample_heun"),
    ("edm_fast.models", "edm_fast.io.models", "load_denoiser"),
    ("edm_fast.official", "edm_fast.io.official", "load_official"),
    ("edm_fast.backends.reference", "edm_fast.sampling.backends.reference", "ReferenceBackend"),
])
def test_old_module_paths_import_with_a_warning(old, new, name):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        moved = importlib.import_module(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(moved, name) is getattr(importlib.import_module(new), name)
