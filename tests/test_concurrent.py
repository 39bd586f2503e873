"""Two runs at once on one output: extract and export_parts each write their own temporary (both succeed,
the output is whole); a stage with a resume directory refuses the second run, naming the first's pid."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_stages
from conftest import write_params
from pipeline.errors import PipelineError
from pipeline.resume import LOCK_NAME, exclusive_run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Inputs of both stages, and what one run alone writes (extract: the features the parts are built on)."""
    from pipeline.config import ExportPartsConfig
    from pipeline.parts.export import export_parts

    root = tmp_path_factory.mktemp("built")
    prepared = tiny_stages.prepared(root)
    teacher = tiny_stages.teacher(root)
    parts = tiny_stages.parts(root, prepared, teacher)  # extracts root/features with batch_size 8
    export_parts(ExportPartsConfig(grid=None, batch_size=8), prepared, teacher, parts, root / "part_shards")
    return prepared, teacher, parts, {"extract": root / "features", "export_parts": root / "part_shards"}


def digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["extract", "export_parts"])
def test_two_runs_on_one_output_both_succeed_with_a_whole_output(built, tmp_path, stage):
    """Before: both wrote the fixed .<out>.tmp, and one deleted or renamed the other's files mid-run."""
    prepared, teacher, parts, alone = built
    write_params(tmp_path / "params.yaml", extract={"batch_size": 8}, export_parts={"grid": None, "batch_size": 8})
    args = [stage, "--params", "params.yaml", "--prepared", str(prepared), "--teacher", str(teacher)]
    args += ["--parts", str(parts)] if stage == "export_parts" else []
    runs = tiny_stages.run_together(tmp_path, [*args, "--out", "out", "--metrics", "m1.json"],
                                    [*args, "--out", "out", "--metrics", "m2.json"])  # fmt: skip
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert digest(tmp_path / "out") == digest(alone[stage])  # whole: what one run alone writes
    assert (tmp_path / "m1.json").read_text() == (tmp_path / "m2.json").read_text()
    assert leftovers(tmp_path / "out") == []


def test_a_held_resume_directory_refuses_a_second_run_and_is_free_again_after(tmp_path):
    resume = tmp_path / "resume"
    with exclusive_run(resume, "pretrain"):
        assert (resume / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(PipelineError, match=rf"{resume} is in use by another run \(pid {os.getpid()}, .*two runs of "
                                                rf"`semmae pretrain` .*kill {os.getpid()}.*another --resume directory"):  # fmt: skip
            with exclusive_run(resume, "pretrain"):
                pass
    assert list(resume.iterdir()) == []  # the lock file goes with the run
    with exclusive_run(resume, "pretrain"):
        pass


HOLDER = """
import sys, time
from pipeline.resume import exclusive_run
with exclusive_run(sys.argv[1], "teacher"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_never_blocks_the_rerun(tmp_path):
    resume = tmp_path / "resume"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(resume)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(PipelineError, match=rf"pid {proc.pid}\b"):
            with exclusive_run(resume, "teacher"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (resume / LOCK_NAME).exists()  # SIGKILL ran no cleanup ...
    with exclusive_run(resume, "teacher"):  # ... and the kernel released the lock
        assert (resume / LOCK_NAME).read_text().strip() == str(os.getpid())


RUN = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
       "decoder_depth": 1, "decoder_num_heads": 2, "epochs": 3, "batch_size": 16, "steps_per_epoch": 3,
       "warmup_epochs": 0.5, "shuffle_buffer": 32, "num_figure_images": 3}  # fmt: skip


def test_two_pretrain_runs_on_one_resume_directory_one_is_refused_the_other_finishes(tmp_path, part_shards):
    """Before: both trained, and one crashed renaming the other's resume files (or both wrote the outputs)."""
    write_params(tmp_path / "params.yaml", pretrain={"seeds": [0], "common": RUN, "variants": {"semantic": {}}})
    args = ["pretrain", "--params", "params.yaml", "--variant", "semantic", "--part-shards", str(part_shards),
            "--out", "out", "--resume", "resume", "--metrics", "m.json", "--curves", "c.tsv"]  # fmt: skip
    runs = tiny_stages.run_together(tmp_path, args, args)
    assert sorted(r.returncode for r in runs) == [0, 2], [r.stderr[-2000:] for r in runs]
    winner, refused = sorted(runs, key=lambda r: r.returncode)
    assert f"semmae pretrain: error: resume is in use by another run (pid {winner.pid}," in refused.stderr
    assert "Traceback" not in refused.stderr
    assert len((tmp_path / "c.tsv").read_text().splitlines()) == 1 + 9 and (tmp_path / "out" / "encoder.pth").is_file()
    assert list((tmp_path / "resume").iterdir()) == []  # cleared, lock file gone
