"""Every torch.distributed collective goes through pipeline/distributed.py, which moves tensors to the
backend's device (NCCL takes CUDA tensors only): no other module of pipeline/ or stages/ calls one
directly, however torch.distributed is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "pipeline" / "distributed.py"
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_reduce_multigpu", "broadcast", "broadcast_multigpu",
    "broadcast_object_list", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_gather_coalesced",
    "all_gather_multigpu", "_all_gather_base", "gather", "gather_object", "scatter", "scatter_object_list",
    "reduce", "reduce_multigpu", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_multigpu",
    "_reduce_scatter_base", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "send_object_list", "recv_object_list", "all_to_all", "all_to_all_single", "P2POp",
}  # fmt: skip
DIST = "torch.distributed"


def direct_collectives(source: str, filename: str = "<source>") -> list[str]:
    """``"file:line name"`` for every use of a torch.distributed collective in ``source``: attribute
    chains through any alias of ``torch``/``torch.distributed`` (``torch.distributed.x``, ``dist.x``,
    ``torch.distributed.distributed_c10d.x``) and ``from torch.distributed[...] import x``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> the dotted module/object it stands for
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    root = a.name.split(".")[0]
                    aliases[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                aliases[a.asname or a.name] = full
                if (full == DIST or full.startswith(DIST + ".")) and a.name in COLLECTIVES:
                    found.append(f"{filename}:{node.lineno} from {node.module} import {a.name}")

    def dotted(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = dotted(node.value)
            if base and (base == DIST or base.startswith(DIST + ".")):
                found.append(f"{filename}:{node.lineno} {base}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in COLLECTIVES:
            full = aliases.get(node.func.id, "")
            if full.startswith(DIST + "."):
                found.append(f"{filename}:{node.lineno} {full}()")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in COLLECTIVES):  # fmt: skip
            base = dotted(node.args[0])
            if base and (base == DIST or base.startswith(DIST + ".")):
                found.append(f"{filename}:{node.lineno} getattr({base}, {node.args[1].value!r})")
    return sorted(set(found))


def test_only_the_helper_module_calls_collectives():
    modules = sorted(p for d in ("pipeline", "stages") for p in (REPO / d).rglob("*.py") if p != HELPER)
    assert len(modules) > 20  # the scan sees the library and the stages
    found = [hit for p in modules for hit in direct_collectives(p.read_text(), str(p.relative_to(REPO)))]
    assert not found, ("call these through pipeline.distributed (broadcast, sum_over_ranks, barrier, ...):\n"
                       + "\n".join(found))  # fmt: skip


def test_the_helper_module_itself_is_seen_by_the_scan():
    assert any("all_reduce" in hit for hit in direct_collectives(HELPER.read_text()))


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.distributed.all_reduce(t)",
    "import torch\nimport torch.distributed\ntorch.distributed.broadcast(t, 0)",
    "import torch.distributed as dist\ndist.all_gather(xs, t)",
    "from torch import distributed as dist\ndist.barrier()",
    "import torch as th\nth.distributed.reduce_scatter_tensor(o, t)",
    "from torch.distributed import broadcast_object_list\nbroadcast_object_list(objs, 0)",
    "from torch.distributed import all_to_all_single as a2a\na2a(o, t)",
    "import torch.distributed.distributed_c10d as c10d\nc10d.send(t, 1)",
    "import torch.distributed as dist\nop = getattr(dist, 'all_reduce')",
    "import torch.distributed as dist\nreqs = [dist.isend(t, 1)]",
])  # fmt: skip
def test_every_import_style_is_caught(snippet):
    assert direct_collectives(snippet)


@pytest.mark.parametrize("snippet", [
    "import torch.distributed as dist\nif dist.is_initialized(): r = dist.get_rank()",
    "from pipeline import distributed as D\nD.broadcast(t, 0)\nD.barrier()",
    "import numpy as np\nnp.broadcast(a, b)",
    "def broadcast(t, src): return t\nbroadcast(t, 0)",
])  # fmt: skip
def test_non_collectives_and_the_helper_are_allowed(snippet):
    assert not direct_collectives(snippet)
