"""``jee1-convert``: Llama-2 base + PEFT LoRA/QLoRA adapter -> one verified, checksummed GGUF."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from jee1 import __version__
from jee1.logs import configure_logging
from jee1.errors import Jee1Error, ResourceError, exit_codes, os_error_line
from jee1.prompts import DEFAULT_TEMPLATE, template_names

from .bnb4 import BLOCKSIZES, QloraBase
from .quant_types import DEFAULT_QUANT, QUANT_TYPES, quant_type

EPILOG = exit_codes(1, 2, 3, 4)       # the converter never answers "busy"


def _qlora_base(ctx: click.Context, kind: str, dtype: str, blocksize: int, double_quant: bool) -> QloraBase | None:
    if kind == "none":
        given = [f"--{name.replace('_', '-')}" for name in ("qlora_dtype", "qlora_blocksize", "qlora_double_quant")
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --qlora-base nf4 or fp4")
        return None
    try:
        return QloraBase(kind, dtype, blocksize, double_quant)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--qlora-blocksize") from None


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through the pipeline's cleanup


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="jee1-convert")
@click.argument("base_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--adapter", "adapter_dir", type=click.Path(path_type=Path, file_okay=False),
              help="PEFT LoRA/QLoRA adapter directory (adapter_config.json + adapter_model.safetensors, or the "
                   "adapter_model.bin older PEFT wrote: read without running its pickle). "
                   "Without it the base is converted alone.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Output GGUF path; its manifest is written next to it as OUTPUT.manifest.json.")
@click.option("--quant", default=DEFAULT_QUANT, show_default=True, metavar="|".join(QUANT_TYPES),
              help="Output type. F16/BF16 are written directly; the others are quantized by llama.cpp "
                   "from an F16 intermediate.")
@click.option("--template", default=DEFAULT_TEMPLATE, show_default=True, metavar="NAME|FILE",
              help=f"Chat template stored as tokenizer.chat_template: {', '.join(template_names())}, "
                   "or a Jinja file.")
@click.option("--threads", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True,
              help="Threads for llama.cpp's quantizer.")
@click.option("--keep-intermediate", is_flag=True, help="Keep the F16 intermediate as OUTPUT-stem.F16.gguf.")
@click.option("--verify-against-f16", is_flag=True,
              help="After quantizing, measure KL divergence and top-1 agreement against the F16 intermediate on "
                   "a medical text; fail (exit 4, nothing kept) above the thresholds; results go to the manifest.")
@click.option("--verify-text", type=click.Path(path_type=Path, dir_okay=False),
              help="Text for --verify-against-f16 (default: the medical text shipped with jee1).")
@click.option("--max-kl", type=click.FloatRange(min=0), default=0.10, show_default=True,
              help="Largest mean KL(F16 || quantized) in nats per token the gate accepts.")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=0.85, show_default=True,
              help="Smallest top-1 agreement with the F16 the gate accepts.")
@click.option("--qlora-base", type=click.Choice(["none", "nf4", "fp4"]), default="none", show_default=True,
              help="Merge into the base as QLoRA trained against it: every decoder linear weight replaced by "
                   "its bitsandbytes 4-bit round trip first (docs/qlora.md). 'none' merges into the 16-bit base. "
                   "Never for an adapter trained with plain LoRA on a 16-bit base.")
@click.option("--qlora-dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="The dtype the QLoRA run loaded the base in (bitsandbytes quantizes the weights as loaded).")
@click.option("--qlora-blocksize", type=int, default=64, show_default=True,
              help="Values per 4-bit block: " + ", ".join(map(str, BLOCKSIZES)) + ".")
@click.option("--qlora-double-quant/--no-qlora-double-quant", default=True, show_default=True,
              help="Whether the run quantized the block scales again (bnb_4bit_use_double_quant).")
@click.option("--model-version", type=click.IntRange(min=1), default=1, show_default=True,
              help="Release number written into the manifest (model.version). Raise it with every release: a "
                   "device refuses a model older than the newest it has accepted (docs/manifest.md).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, warnings and errors only.")
@click.option("-v", "--verbose", count=True, help="More log output (llama.cpp's included).")
@click.pass_context
def main(ctx, base_dir, adapter_dir, output, quant, template, threads, keep_intermediate, verify_against_f16,
         verify_text, max_kl, min_top1, qlora_base, qlora_dtype, qlora_blocksize, qlora_double_quant,
         model_version, as_json, quiet, verbose):
    """Convert a Hugging Face Llama-2 checkpoint (BASE_DIR) and an optional PEFT LoRA adapter
    into a single GGUF for llama.cpp, merged, quantized, verified and checksummed.

    \b
    Example (SM70: Llama-2-70B + the MedAlpaca QLoRA adapter):
      jee1-convert llama-2-70b-hf --adapter sm70-qlora -o sm70.Q4_K_M.gguf --quant Q4_K_M

    \b
    The same adapter merged into the base QLoRA trained against (bitsandbytes NF4, bf16):
      jee1-convert llama-2-70b-hf --adapter sm70-qlora --qlora-base nf4 -o sm70-nf4.Q4_K_M.gguf

    The merge follows PEFT (W + alpha/r * B@A, rsLoRA, rank/alpha patterns, modules_to_save),
    streams one tensor at a time, and writes to a temporary name that is renamed only after
    the result verified: a failed or interrupted run leaves no file under OUTPUT.
    """
    configure_logging(verbose, quiet)
    from jee1.llama_backend import deferring

    signal.signal(signal.SIGTERM, deferring(_terminate))
    from .pipeline import ConvertOptions, convert

    round_trip = _qlora_base(ctx, qlora_base, qlora_dtype, qlora_blocksize, qlora_double_quant)

    try:
        opts = ConvertOptions(base_dir=base_dir, output=output, quant=quant_type(quant), adapter_dir=adapter_dir,
                              template=template, threads=threads, keep_intermediate=keep_intermediate,
                              quiet=quiet or as_json, verify_against_f16=verify_against_f16,
                              verify_text=verify_text, max_kl=max_kl, min_top1=min_top1,
                              qlora_base=round_trip, model_version=model_version)
        result = convert(opts)
    except Jee1Error as e:
        click.echo(f"jee1-convert: error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:   # a read-only or full target folder, a permission: one line, exit 3
        click.echo(f"jee1-convert: error: {os_error_line(e)}", err=True)
        sys.exit(ResourceError.exit_code)
    except KeyboardInterrupt:
        click.echo("jee1-convert: interrupted; no output written", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
    else:
        data = result.as_json()
        click.echo(f"wrote {data['output']} ({data['quant']}, {data['size'] / 2**20:.1f} MiB, "
                   f"{data['tensor_count']} tensors, sha256 {data['sha256'][:16]}...)")
        click.echo(f"manifest {data['manifest']}")
