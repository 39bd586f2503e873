#!/usr/bin/env python3
"""The project code each DVC stage runs, from the static import graph, compared with dvc.yaml.

    python scripts/code_deps.py          # per stage: the code files it imports, and what dvc.yaml misses or has extra
    python scripts/code_deps.py --check  # exit 1 when dvc.yaml and the import graph disagree (what the tests run)

A stage's command is ``semmae <name> ...``; ``stages/cli.py`` maps ``<name>`` to a function of a module
``stages/<module>.py``. The stage's code is that module and every project module (``pipeline.*``, ``stages.*``)
it imports, directly or transitively, wherever the import statement sits (stages import lazily inside their
functions, so a conditional import counts: it is code the stage can run). A package's ``__init__.py`` counts
when it holds more than a docstring. Deliberately outside the closure: ``stages/cli.py`` and the parameter
check it runs before every stage (``pipeline/config/check.py``): they decide whether a stage may start, never
what it writes, and depending on them would rerun the whole DAG for a new sub-command or a new cross-stage check.

Hand-written with ``ast`` rather than ``modulefinder``: modulefinder executes no code either, but it does not
see imports inside functions reliably and follows third-party packages we must not list.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from functools import lru_cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")
OUTSIDE = {"stages/cli.py"}  # see the module docstring


def module_file(name: str) -> Path | None:
    """``pipeline.mae.model`` -> ``pipeline/mae/model.py`` (or a package's ``__init__.py``); None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def is_code(path: Path) -> bool:
    """False for an ``__init__.py`` that holds nothing but a docstring (importing it runs nothing)."""
    body = ast.parse(path.read_text()).body
    if path.name == "__init__.py" and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body):
        return False
    return True


def _imported_names(path: Path) -> set[str]:
    """Every module name an import statement of ``path`` can load, anywhere in the file."""
    pkg = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg.rsplit(".", 1)[0] + "._"  # relative imports resolve against the package itself
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


@lru_cache(maxsize=None)
def closure(path: Path) -> frozenset[str]:
    """Repository-relative paths of the project code that importing/running ``path`` can execute."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in _imported_names(current):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then a/b/c
                found = module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    rel = {p.relative_to(REPO).as_posix() for p in seen if is_code(p)}
    return frozenset(rel - OUTSIDE)


def cli_commands() -> dict[str, str]:
    """``semmae`` sub-command -> ``stages/<module>.py``, read from ``stages/cli.py``'s ``app.command`` calls."""
    text = (REPO / "stages" / "cli.py").read_text()
    found = dict(re.findall(r'app\.command\("([a-z_]+)"\)\(_clean_errors\((\w+)\.\w+\)\)', text))
    return {name: f"stages/{module}.py" for name, module in found.items()}


def declared_code(deps: list[str]) -> dict[str, set[str]]:
    """dvc.yaml dependency -> the project code files it stands for (a folder: every code file under it)."""
    out: dict[str, set[str]] = {}
    for dep in deps:
        if dep.split("/")[0] not in PACKAGES:
            continue
        path = REPO / dep
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        out[dep] = {f.relative_to(REPO).as_posix() for f in files if f.is_file() and is_code(f)}
    return out


def compare(dvc_yaml: Path = REPO / "dvc.yaml") -> dict[str, dict]:
    """Per stage: the code it runs, and the dvc.yaml code dependencies that are missing or surplus."""
    commands = cli_commands()
    result = {}
    for stage, spec in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        spec = spec.get("do", spec)  # a foreach stage: its template
        cmd = " ".join(str(spec["cmd"]).split())
        match = re.match(r"(?:torchrun .*? --no-python )?semmae (\w+)", cmd)
        if not match or match.group(1) not in commands:
            result[stage] = {"error": f"command '{cmd[:60]}' is not a `semmae <stage>` call known to stages/cli.py"}
            continue
        needed = set(closure(REPO / commands[match.group(1)]))
        declared = declared_code([str(d) for d in spec.get("deps", [])])
        covered = set().union(*declared.values()) if declared else set()
        surplus = sorted(dep for dep, files in declared.items() if not files or not files <= needed)
        result[stage] = {"needed": sorted(needed), "missing": sorted(needed - covered), "surplus": surplus}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml and the import graph disagree")
    args = parser.parse_args()
    bad = False
    for stage, res in compare().items():
        if "error" in res:
            print(f"{stage}: {res['error']}")
            bad = True
            continue
        if not args.check:
            print(f"{stage}:\n" + "".join(f"  - {p}\n" for p in res["needed"]))
        for key in ("missing", "surplus"):
            for path in res[key]:
                bad = True
                print(f"{stage}: {key} code dependency {path}")
    return 1 if (bad and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
