"""Import arrows run one way: nothing outside ctpo.train imports ctpo.train, directly or through another module.

The trainers (ctpo.train) sit on top: they import tracking, the verl plugin, the diagnostics' dump format.
Reports reaching the trainers through `ctpo.tracking`, or the verl plugin (imported by the launcher) importing
the launcher's package back, are the arrows against the grain that issue 13 removed. The imports are read
with `ast`, lazy ones inside functions included, so the test runs without torch or verl.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted((ROOT / "ctpo").rglob("*.py"))}


def _with_packages(name: str, known: dict[str, Path]) -> set[str]:
    """`ctpo.a.b` -> the modules executed by importing it: ctpo, ctpo.a, ctpo.a.b (those that exist)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known.keys()


@lru_cache(maxsize=None)
def direct_imports(module: str) -> frozenset[str]:
    """The ctpo modules `module` imports anywhere in its file (module level or inside functions)."""
    known = _modules()
    path = known[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import module` imports pkg.module
        else:
            continue
        for name in names:
            if name == "ctpo" or name.startswith("ctpo."):
                found |= _with_packages(name, known)
    found.discard(module)
    return frozenset(found)


def reachable(module: str) -> set[str]:
    """Every ctpo module that importing `module` (and calling its functions) can import."""
    seen, todo = set(), [module]
    while todo:
        for dep in direct_imports(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def _train(mods) -> list[str]:
    return sorted(m for m in mods if m == "ctpo.train" or m.startswith("ctpo.train."))


def test_the_scanner_sees_lazy_and_package_imports():
    # verl_command imports the plugin inside a function; the plugin imports `from ctpo.diagnostics import verl_dumps`
    assert "ctpo.verl_plugin" in direct_imports("ctpo.train.verl_command")
    assert {"ctpo.diagnostics", "ctpo.diagnostics.verl_dumps"} <= direct_imports("ctpo.verl_plugin")
    assert "ctpo.workdir" in direct_imports("ctpo.tracking")  # lazy, inside wandb_run_id
    assert "ctpo.tracking" in reachable("ctpo.reports.__main__")


def test_no_module_outside_train_imports_train():
    offenders = {m: _train(direct_imports(m)) for m in _modules() if not _train([m])}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_tracking_reports_and_the_verl_plugin_never_reach_train():
    starts = ["ctpo.tracking", "ctpo.verl_plugin", "ctpo.metric_sums", "ctpo.diagnostics.verl_dumps"]
    starts += [m for m in _modules() if m.startswith("ctpo.reports")]
    assert {m: _train(reachable(m)) for m in starts if _train(reachable(m))} == {}


def test_the_verl_plugin_and_its_launcher_form_no_cycle():
    assert "ctpo.train.verl_backend" not in reachable("ctpo.verl_plugin")
    assert "ctpo.verl_plugin" in reachable("ctpo.train.verl_backend")
