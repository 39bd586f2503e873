"""Pretrain settings a user sets, each run through the real ``semmae pretrain`` stage (in-process, tiny
shards, a few steps) and checked by an effect that would be absent if the setting were ignored."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from typer.testing import CliRunner

from conftest import make_part_shards, write_params
from pipeline.mae import train as mae_train
from pipeline.mae.model import MaskedAutoencoder
from pipeline.resume import ResumeStore
from stages.cli import app

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2}  # fmt: skip
RUN = {**TINY, "epochs": 1, "batch_size": 16, "steps_per_epoch": 3, "warmup_epochs": 0.5, "base_lr": 1e-3,
       "shuffle_buffer": 32}  # fmt: skip
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_part_shards(tmp_path_factory.mktemp("parts") / "part_shards")


def pretrain(root: Path, shards: Path, **overrides):
    """``semmae pretrain`` in ``root`` (in-process: seconds faster than a subprocess) with ``RUN`` and
    ``overrides``; outputs ``out/``, ``resume/``, ``m.json`` and ``c.tsv``. Returns the CliRunner result."""
    root.mkdir(parents=True, exist_ok=True)
    write_params(root / "params.yaml", pretrain={"seeds": [0], "common": {**RUN, **overrides},
                                                 "variants": {"semantic": {"masking": "semantic"}}})  # fmt: skip
    args = ["pretrain", "--params", "params.yaml", "--variant", "semantic", "--part-shards", str(shards), "--out",
            "out", "--resume", "resume", "--metrics", "m.json", "--curves", "c.tsv"]  # fmt: skip
    with contextlib.chdir(root):
        return CliRunner().invoke(app, args)


def ok(res) -> None:
    assert res.exit_code == 0, (res.stderr[-3000:], res.exception)


def curves(path: Path) -> dict[str, list[float]]:
    """The curve TSV's columns by name."""
    rows = [r.split("\t") for r in path.read_text().splitlines()]
    return {c: [float(r[i]) for r in rows[1:]] for i, c in enumerate(rows[0])}


def leftovers(root: Path) -> list[str]:
    """Temporaries of an atomic write (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``) anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for pattern in (".*.tmp-*", ".*.old-*") for p in root.rglob(pattern))


@pytest.fixture
def forward_calls(monkeypatch) -> list[dict]:
    """Every MAE forward pass of the runs in the test: its input images, mask, prediction and loss."""
    calls: list[dict] = []
    real = MaskedAutoencoder.forward

    def spy(self, imgs, masking):
        loss, pred = real(self, imgs, masking)
        calls.append({"imgs": imgs.detach().clone(), "mask": masking.mask.clone(), "pred": pred.detach().clone(),
                      "loss": float(loss.detach())})  # fmt: skip
        return loss, pred

    monkeypatch.setattr(MaskedAutoencoder, "forward", spy)
    return calls


def test_schedule_reversed_and_fixed_set_the_logged_alpha_and_the_masks(tmp_path, shards):
    """2 epochs x 3 steps, alpha per iteration at step s (0-based) of T = 6: reversed 1 - (s/6)^2, fixed its
    alpha. The masks follow alpha: the same init, data and noise at alpha 1 give reversed's first loss."""
    ok(pretrain(tmp_path / "rev", shards, epochs=2, schedule="reversed", gamma=2.0))
    ok(pretrain(tmp_path / "fix1", shards, schedule="fixed", alpha=1.0))
    ok(pretrain(tmp_path / "fix0", shards, schedule="fixed", alpha=0.0))
    rev, fix1, fix0 = (curves(tmp_path / n / "c.tsv") for n in ("rev", "fix1", "fix0"))
    assert rev["step"] == [1, 2, 3, 4, 5, 6]
    assert rev["alpha"] == pytest.approx([1, 35 / 36, 32 / 36, 27 / 36, 20 / 36, 11 / 36], rel=1e-5)
    assert fix1["alpha"] == [1.0] * 3 and fix0["alpha"] == [0.0] * 3
    assert rev["loss"][0] == fix1["loss"][0]  # alpha 1 at the first step of both
    assert abs(fix1["loss"][0] - fix0["loss"][0]) > 1e-3  # other masks, another loss


def _independent_loss(call: dict, norm_pix: bool) -> float:
    """The MAE loss of a recorded forward pass, computed here: targets are the [0, 1] pixels (loss_target
    "pixels") cut into (row, col, channel)-ordered patches, per-patch normalised when ``norm_pix``."""
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    pixels = call["imgs"] * std + torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    p = TINY["patch_size"]
    patches = pixels.unfold(2, p, p).unfold(3, p, p)  # [B, 3, gh, gw, p, p]
    target = patches.permute(0, 2, 3, 4, 5, 1).flatten(1, 2).flatten(2)  # [B, L, p * p * 3]
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((call["pred"] - target) ** 2).mean(-1)
    return float((per_patch * call["mask"]).sum() / call["mask"].sum())


@pytest.mark.parametrize("norm_pix", [True, False])
def test_norm_pix_loss_sets_the_targets_of_the_logged_loss(tmp_path, shards, forward_calls, norm_pix):
    ok(pretrain(tmp_path, shards, steps_per_epoch=1, norm_pix_loss=norm_pix))
    (call,) = forward_calls
    logged = curves(tmp_path / "c.tsv")["loss"][0]
    assert logged == pytest.approx(_independent_loss(call, norm_pix), rel=1e-5)
    assert logged != pytest.approx(_independent_loss(call, not norm_pix), rel=1e-2)  # the modes differ here


def test_clip_grad_clips_the_gradient_the_optimiser_steps_with(tmp_path, shards):
    norms: list[float] = []

    def record(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    hook = register_optimizer_step_pre_hook(record)  # every optimiser, before its step
    try:
        ok(pretrain(tmp_path / "free", shards))
        free, norms[:] = list(norms), []
        ok(pretrain(tmp_path / "clipped", shards, clip_grad=0.01))
        clipped = list(norms)
    finally:
        hook.remove()
    assert len(free) == len(clipped) == 3
    assert min(free) > 0.1  # the raw gradients are far above the limit...
    assert clipped == pytest.approx([0.01] * 3, rel=1e-4)  # ...and the optimiser steps with them clipped to it


def test_precision_bf16_autocasts_the_forward_pass_on_the_cpu(tmp_path, shards, forward_calls):
    ok(pretrain(tmp_path / "fp32", shards, steps_per_epoch=1, precision="fp32"))
    ok(pretrain(tmp_path / "bf16", shards, steps_per_epoch=1, precision="bf16"))
    fp32, bf16 = forward_calls
    assert fp32["pred"].dtype == torch.float32 and bf16["pred"].dtype == torch.bfloat16
    assert torch.equal(fp32["imgs"], bf16["imgs"]) and torch.equal(fp32["mask"], bf16["mask"])  # the same batch
    # the same model on the same batch, in bf16: close to fp32's loss, not equal
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05) and bf16["loss"] != fp32["loss"]
    assert curves(tmp_path / "bf16" / "c.tsv")["loss"][0] == pytest.approx(bf16["loss"], rel=1e-5)


def test_compile_runs_the_model_through_torch_compile(tmp_path, shards, monkeypatch):
    import torch
    from torch._dynamo.utils import counters

    # inductor's C++ build costs ~40 s on a cold CPU machine; aot_eager traces the same graphs (forward and
    # backward through dynamo and AOTAutograd) in seconds, which is what this test is about: the setting is used
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": "aot_eager"}))
    counters.clear()
    ok(pretrain(tmp_path / "eager", shards, steps_per_epoch=1, depth=1))
    assert counters["stats"]["unique_graphs"] == 0
    ok(pretrain(tmp_path / "compiled", shards, steps_per_epoch=1, depth=1, compile=True))
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the model's graph
    eager, compiled = (curves(tmp_path / n / "c.tsv")["loss"] for n in ("eager", "compiled"))
    assert compiled == pytest.approx(eager, rel=1e-4)  # the same step, compiled


class _Killed(Exception):
    pass


def test_checkpoint_every_and_log_every_and_a_resume_from_such_a_checkpoint(tmp_path, shards, monkeypatch):
    """3 epochs x 3 steps, checkpoint_every 2, log_every 2: resume states at epochs 2 and 3 (the last always),
    curve rows at steps 2, 4, 6, 8. A run killed right after its epoch-2 state resumes at epoch 2 (not 0) to
    the unbroken run's outputs and curves, byte for byte."""
    saved: list[int] = []
    die = {"after_save": False}

    class SpyStore(ResumeStore):
        def save(self, state):
            super().save(state)
            saved.append(state["epoch"])
            if die["after_save"]:
                raise _Killed

    monkeypatch.setattr(mae_train, "ResumeStore", SpyStore)
    every = {"epochs": 3, "checkpoint_every": 2, "log_every": 2}
    ok(pretrain(tmp_path / "unbroken", shards, **every))
    assert saved == [2, 3]
    assert curves(tmp_path / "unbroken" / "c.tsv")["step"] == [2, 4, 6, 8]
    assert curves(tmp_path / "unbroken" / "c.tsv")["epoch"] == [1, 2, 2, 3]

    saved.clear()
    die["after_save"] = True
    res = pretrain(tmp_path / "broken", shards, **every)
    assert isinstance(res.exception, _Killed) and saved == [2]
    assert torch.load(tmp_path / "broken" / "resume" / "last.pth", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "broken" / "out").exists()
    die["after_save"] = False
    ok(pretrain(tmp_path / "broken", shards, **every))
    assert saved == [2, 3] and json.loads((tmp_path / "broken" / "m.json").read_text())["resumed_from_epoch"] == 2
    for name in ("encoder.pth", "mae.pth", "meta.json"):
        assert (tmp_path / "broken" / "out" / name).read_bytes() == (tmp_path / "unbroken" / "out" / name).read_bytes()
    assert (tmp_path / "broken" / "c.tsv").read_text() == (tmp_path / "unbroken" / "c.tsv").read_text()


def test_a_loss_that_becomes_nan_stops_the_run_with_advice_and_publishes_nothing(tmp_path, shards):
    res = pretrain(tmp_path, shards, base_lr=1e30, warmup_epochs=0.0)
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert re.search(r"semmae pretrain: error: pretrain loss became nan at step [1-3] \(epoch 1\): lower pretrain "
                     r"base_lr \(1e\+30, peak lr 6.25e\+28\), lengthen warmup_epochs \(0.0\) or set clip_grad",
                     res.stderr), res.stderr  # fmt: skip
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    assert [p for p in leftovers(tmp_path) if not p.startswith(".c.tsv.")] == []  # (the curves' rows so far are staged)


@pytest.mark.slow
def test_a_batch_the_ranks_and_accumulation_cannot_split_fails_before_any_compute(tmp_path, shards):
    """batch_size 12 with accum_steps 4 is valid in one process (micro-batch 3) but not over 2 torchrun ranks."""
    common = {**RUN, "batch_size": 12, "accum_steps": 4}
    write_params(tmp_path / "params.yaml", pretrain={"seeds": [0], "common": common,
                                                     "variants": {"semantic": {"masking": "semantic"}}})  # fmt: skip
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", "semmae", "pretrain", "--params",
           "params.yaml", "--variant", "semantic", "--part-shards", str(shards), "--out", "out", "--resume", "resume",
           "--metrics", "m.json", "--curves", "c.tsv"]  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert ("semmae pretrain: error: pretrain batch_size=12 (the global batch) is not divisible by 2 rank(s) x "
            "accum_steps=4 = 8: set batch_size to a multiple of 8 (e.g. 8 or 16)") in res.stderr  # fmt: skip
    assert "pretrain semantic:" not in res.stderr  # no training step began (its progress bar)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    assert not (tmp_path / "resume").exists() or not any((tmp_path / "resume").glob("*.pth"))
