"""The ``semmae`` command: one sub-command per DVC stage (see ``dvc.yaml``)."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

import typer

from pipeline.errors import PipelineError
from stages import export_parts, extract, linprobe, prepare, pretrain, report, teacher, train_parts

app = typer.Typer(
    name="semmae",
    help="SemMAE pipeline stages. Each reads its own section of params.yaml and writes the outputs "
    "declared for it in dvc.yaml; run them all with `dvc repro`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _clean_errors(fn: Callable) -> Callable:
    """Turn a PipelineError into one clear line on stderr and exit status 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            print(f"semmae {fn.__module__.rsplit('.', 1)[-1]}: error: {exc}", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return wrapper


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


app.command("prepare")(_clean_errors(prepare.main))
app.command("teacher")(_clean_errors(teacher.main))
app.command("extract")(_clean_errors(extract.main))
app.command("train_parts")(_clean_errors(train_parts.main))
app.command("export_parts")(_clean_errors(export_parts.main))
app.command("pretrain")(_clean_errors(pretrain.main))
app.command("linprobe")(_clean_errors(linprobe.main))
app.command("linprobe_reference")(_clean_errors(linprobe.reference))
app.command("report")(_clean_errors(report.main))

if __name__ == "__main__":
    app()
