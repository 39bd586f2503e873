"""The ``semmae`` command: one sub-command per DVC stage (see ``dvc.yaml``)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Callable

import typer

from pipeline.errors import PipelineError
from stages import (export_parts, extract, finetune, linprobe, parts_source, prepare, pretrain, pretrain_figures, report,
                    teacher, train_parts)

app = typer.Typer(
    name="semmae",
    help="SemMAE pipeline stages. Each reads its own section of params.yaml and writes the outputs "
    "declared for it in dvc.yaml; run them all with `dvc repro`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Stages that run in one process: under torchrun, ranks > 0 return at once (rank 0 does the work and
# writes). prepare has its own worker processes; the part learner trains on cached features in minutes;
# pretrain_figures draws a few images on the CPU.
# parts_source builds on rank 0, then exports on every rank.
# teacher, extract, export_parts, pretrain, linprobe and finetune share their work across the ranks.
RANK0_STAGES = {"check", "prepare", "train_parts", "pretrain_figures", "report"}


def command_name(fn: Callable) -> str:
    """The sub-command of a stage function: ``stages/<m>.py``'s ``main`` is ``<m>``, its other functions ``f``
    are ``<m>_f`` (linprobe_reference, finetune_scratch); this module's own functions keep their name."""
    module = fn.__module__.rsplit(".", 1)[-1]
    if fn.__module__ == __name__:
        return fn.__name__
    return module if fn.__name__ == "main" else f"{module}_{fn.__name__}"


def _clean_errors(fn: Callable) -> Callable:
    """Turn a PipelineError into one clear line on stderr, naming the sub-command the user ran, and exit
    status 2, without a traceback."""
    name = command_name(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        if rank > 0 and name in RANK0_STAGES:
            logging.getLogger("semmae").info("%s runs in one process: rank %d has nothing to do", name, rank)
            return None
        try:
            if kwargs.get("params") is not None:  # the whole file, cross-stage constraints included
                _check(kwargs["params"])
            return fn(*args, **kwargs)
        except PipelineError as exc:
            print(f"semmae {name}: error: {exc}", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return wrapper


def _check(params) -> None:
    from pipeline.config.check import check_params

    report = check_params(params)
    for warning in report.warnings:
        logging.getLogger("semmae.check").warning(warning)
    report.raise_errors()


def check(params: Path = typer.Option(Path("params.yaml"), help="Parameter file to check.")) -> None:
    """Check every section of PARAMS and what must agree across stages (grids, batches, shards), without
    computing anything: the check every stage runs first, on its own."""
    typer.echo(f"{params}: every section valid, stages consistent")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


app.command("check")(_clean_errors(check))
app.command("prepare")(_clean_errors(prepare.main))
app.command("teacher")(_clean_errors(teacher.main))
app.command("extract")(_clean_errors(extract.main))
app.command("train_parts")(_clean_errors(train_parts.main))
app.command("export_parts")(_clean_errors(export_parts.main))
app.command("parts_source")(_clean_errors(parts_source.main))
app.command("pretrain")(_clean_errors(pretrain.main))
app.command("pretrain_figures")(_clean_errors(pretrain_figures.main))
app.command("linprobe")(_clean_errors(linprobe.main))
app.command("linprobe_reference")(_clean_errors(linprobe.reference))
app.command("finetune")(_clean_errors(finetune.main))
app.command("finetune_scratch")(_clean_errors(finetune.scratch))
app.command("report")(_clean_errors(report.main))

if __name__ == "__main__":
    app()
