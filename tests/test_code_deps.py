"""dvc.yaml's code dependencies are exactly each stage's import closure (scripts/code_deps.py).

A file a stage imports but does not list leaves the stage "up to date" after an edit while its outputs are
stale; a listed file it never imports reruns it for nothing. Both fail here, naming stage and file.
"""

from __future__ import annotations

import importlib.util
import sys

import yaml

from conftest import REPO

spec = importlib.util.spec_from_file_location("code_deps", REPO / "scripts" / "code_deps.py")
code_deps = importlib.util.module_from_spec(spec)
sys.modules["code_deps"] = code_deps
spec.loader.exec_module(code_deps)


def problems(result: dict) -> list[str]:
    out = []
    for stage, res in result.items():
        out += [f"{stage}: {res['error']}"] if "error" in res else []
        out += [f"{stage}: {kind} {path}" for kind in ("missing", "surplus") for path in res.get(kind, [])]
    return out


def test_every_stage_depends_on_exactly_the_code_it_imports():
    result = code_deps.compare()
    assert set(result) >= {"prepare", "teacher", "extract", "train_parts", "export_parts", "pretrain",
                            "pretrain_figures", "linprobe", "linprobe_reference", "report"}  # fmt: skip
    assert problems(result) == [], "dvc.yaml disagrees with the import graph (python scripts/code_deps.py):\n" + \
        "\n".join(problems(result))


def edited(tmp_path, stage: str, remove: str | None = None, add: str | None = None):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = dvc["stages"][stage]["deps"]
    if remove:
        deps.remove(remove)
    if add:
        deps.append(add)
    path = tmp_path / "dvc.yaml"
    path.write_text(yaml.safe_dump(dvc, sort_keys=False))
    return code_deps.compare(path)


def test_a_removed_dependency_is_named(tmp_path):
    result = edited(tmp_path, "export_parts", remove="pipeline/parts/model.py")
    assert problems(result) == ["export_parts: missing pipeline/parts/model.py"]


def test_a_surplus_dependency_is_named(tmp_path):
    result = edited(tmp_path, "prepare", add="pipeline/mae")  # a folder counts only if all of it is imported
    assert problems(result) == ["prepare: surplus pipeline/mae"]


def test_imports_inside_functions_and_package_inits_count():
    pretrain = code_deps.closure(REPO / "stages" / "pretrain.py")
    assert "pipeline/mae/train.py" in pretrain  # imported inside main()
    assert "pipeline/config/__init__.py" in pretrain  # has code: runs on any pipeline.config.* import
    assert "pipeline/mae/__init__.py" not in pretrain  # a docstring only: runs nothing
    assert "stages/cli.py" not in pretrain  # the dispatcher is deliberately outside (see scripts/code_deps.py)


def test_figures_never_retrain_a_model():
    """Drawing lives in its own stage: a font change in the figure code must not rerun pretraining."""
    for stage in ("pretrain", "linprobe", "linprobe_reference", "extract", "export_parts"):
        module = code_deps.cli_commands()[stage]
        assert not [p for p in code_deps.closure(REPO / module) if "figures" in p], stage
