"""``jee1``: the device CLI."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from jee1 import __version__
from jee1.convert.cli import configure_logging
from jee1.errors import EXIT_CODES, Jee1Error

EPILOG = "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + "."


def _fail(e: Jee1Error):
    click.echo(f"jee1: error: {e}", err=True)
    sys.exit(e.exit_code)


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="jee1")
@click.option("-v", "--verbose", count=True, help="More log output (llama.cpp's included).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only, no progress bars.")
@click.pass_context
def main(ctx, verbose, quiet):
    """JEE1 device runtime for SM70, the offline medical question-answering model."""
    configure_logging(verbose, quiet)
    ctx.obj = {"quiet": quiet}


@main.command(epilog=EPILOG)
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
@click.option("--tensors", is_flag=True, help="Also list every tensor with its shape and type.")
def inspect(model, as_json, tensors):
    """Print a GGUF's metadata and its tensor-type summary.

    Long arrays (the vocabulary) are summarised by element type and length.
    """
    from jee1.gguf_info import read_gguf

    try:
        summary = read_gguf(model)
    except Jee1Error as e:
        _fail(e)
    data = summary.as_json()
    if tensors:
        data["tensors"] = [{"name": t.name, "shape": list(t.shape), "type": t.type} for t in summary.tensors]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{data['file']}: {data['size'] / 2**20:.1f} MiB, {data['tensor_count']} tensors, "
               f"{data['parameter_count']:,} parameters")
    click.echo("metadata:")
    for key, value in data["metadata"].items():
        shown = value if not isinstance(value, str) or len(value) < 120 else value[:117] + "..."
        click.echo(f"  {key} = {json.dumps(shown, ensure_ascii=False)}")
    click.echo("tensor types:")
    for ttype, info in data["tensor_types"].items():
        click.echo(f"  {ttype:<6} {info['tensors']:>5} tensors  {info['bytes'] / 2**20:>10.2f} MiB")
    for t in data.get("tensors", []):
        click.echo(f"  {t['name']:<28} {str(t['shape']):<16} {t['type']}")


@main.command(epilog=EPILOG)
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False),
              help="Where to build the tiny model and its GGUF (default: a temporary directory, removed after).")
@click.option("--question", default=None, help="The question to ask (default: a fixed anaphylaxis question).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def demo(ctx, workdir, question, as_json):
    """End-to-end demo without the real model: build the tiny Llama-2 checkpoint and LoRA adapter,
    convert them to Q4_K_M, load the GGUF with llama.cpp and answer one question.

    The tiny model's weights are random, so its answer is noise; every step it runs is the real one.
    """
    from .demo import QUESTION, run_demo

    try:
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="jee1-demo-") as tmp:
                result = run_demo(Path(tmp), question or QUESTION, quiet=ctx.obj["quiet"] or as_json)
        else:
            result = run_demo(workdir, question or QUESTION, quiet=ctx.obj["quiet"] or as_json)
    except Jee1Error as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({"model": str(result.model), "manifest": str(result.manifest),
                               "question": question or QUESTION, "prompt": result.prompt,
                               "answer": result.answer, "completion_tokens": result.tokens}, indent=2))
        return
    click.echo(f"model:    {result.model.name} (Q4_K_M, converted from the tiny checkpoint + LoRA)")
    click.echo(f"question: {question or QUESTION}")
    click.echo(f"answer:   {result.answer.strip()!r}  ({result.tokens} tokens; random tiny model, so noise)")
