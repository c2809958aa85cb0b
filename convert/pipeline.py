"""The conversion, phase by phase: validate -> merge+write -> quantize -> verify -> manifest -> rename.

Every input is validated before any byte is written.  Output goes to hidden temporary names in
the target directory and is renamed into place only after it verified; any failure or
interruption removes the temporaries, so the final name never holds a partial file.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
from gguf import LlamaFileType

from jee1 import __version__
from jee1.errors import InputError, ResourceError, VerificationError
from jee1.gguf_info import GgufSummary, read_gguf
from jee1.manifest import MANIFEST_FORMAT, file_record, manifest_path, write_json_atomic
from jee1.procstat import reset_peak_rss, status_bytes
from jee1.prompts import DEFAULT_TEMPLATE, load_template

from .adapter import Adapter
from .bnb4 import QloraBase
from .checkpoint import Checkpoint
from .input_hashes import InputHashes
from .progress import phase_bar
from .quant_types import QuantType
from .tensor_map import tensor_specs
from .vocab import load_vocab
from .writer import Provenance, tensor_plan, write_gguf

log = logging.getLogger(__name__)

MODEL_NAME = "SM70"
METADATA_MARGIN = 64 * 1024 * 1024  # vocabulary, KV pairs and alignment padding, generously


@dataclass
class ConvertOptions:
    base_dir: Path
    output: Path
    quant: QuantType
    adapter_dir: Path | None = None
    template: str = DEFAULT_TEMPLATE
    threads: int = max(1, os.cpu_count() or 1)
    keep_intermediate: bool = False
    quiet: bool = False
    model_name: str = MODEL_NAME
    verify_against_f16: bool = False     # KL quality gate of the quantized file against the F16
    verify_text: Path | None = None      # default: the medical text shipped in convert/data
    max_kl: float = 0.10                 # mean KL(F16 || quantized) allowed, nats per token
    min_top1: float = 0.85               # top-1 agreement required
    qlora_base: QloraBase | None = None  # merge into the 4-bit round trip of the base QLoRA trained on
    model_version: int = 1               # release number in the manifest: devices refuse going back


@dataclass
class PhaseStats:
    seconds: float
    bytes: int
    peak_rss: int | None   # bytes, this phase alone (Linux)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


@dataclass
class ConvertResult:
    output: Path
    manifest: Path
    manifest_data: dict
    summary: GgufSummary
    intermediate: Path | None
    phases: dict[str, PhaseStats] = field(default_factory=dict)

    def as_json(self) -> dict:
        model = self.manifest_data["model"]
        return {
            "output": str(self.output), "manifest": str(self.manifest),
            "quant": model["quant"], "size": model["size"], "sha256": model["sha256"],
            "tensor_count": model["tensor_count"], "parameter_count": model["parameter_count"],
            "tensor_types": model["tensor_types"],
            "quality_gate": self.manifest_data.get("quality_gate"),
            "intermediate": str(self.intermediate) if self.intermediate else None,
            "phases": {k: {"seconds": round(v.seconds, 3), "bytes": v.bytes, "mb_per_s": round(v.mb_per_s, 1),
                           "peak_rss": v.peak_rss} for k, v in self.phases.items()},
        }


class _Phase:
    def __init__(self, result: ConvertResult, name: str):
        self.result, self.name, self.bytes = result, name, 0

    def __enter__(self):
        reset_peak_rss()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.result.phases[self.name] = PhaseStats(time.perf_counter() - self.start, self.bytes, status_bytes("VmHWM"))


def _check_disk_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ResourceError(f"{directory}: {free / 2**30:.2f} GiB free, the conversion needs about "
                            f"{needed / 2**30:.2f} GiB (intermediate and output)")


def _verify(path: Path, checkpoint: Checkpoint, quant: QuantType) -> GgufSummary:
    """The written file must parse, hold exactly the planned tensors, and load in llama.cpp."""
    from jee1.llama_backend import vocab_token_count

    summary = read_gguf(path)
    meta = summary.metadata
    if meta.get("general.architecture") != "llama" or meta.get("general.file_type") != int(quant.file_type):
        raise VerificationError(f"{path}: architecture/file type are {meta.get('general.architecture')}/"
                                f"{meta.get('general.file_type')}, expected llama/{int(quant.file_type)}")
    expected = {s.gguf_name: s for s in tensor_specs(checkpoint.config)}
    found = {t.name: t for t in summary.tensors}
    if set(found) != set(expected):
        raise VerificationError(f"{path}: tensors differ from the plan "
                                f"(missing {sorted(set(expected) - set(found))[:3]}, "
                                f"extra {sorted(set(found) - set(expected))[:3]})")
    for name, spec in expected.items():
        t = found[name]
        if t.shape != spec.shape or (spec.is_norm and t.type != "F32"):
            raise VerificationError(f"{path}: tensor {name} is {list(t.shape)} {t.type}, "
                                    f"expected {list(spec.shape)}{' F32' if spec.is_norm else ''}")
    if quant.primary.name not in summary.type_counts():
        raise VerificationError(f"{path}: no tensor of type {quant.primary.name} after {quant.name} conversion")
    n_tokens = vocab_token_count(path)
    if n_tokens != checkpoint.config.vocab_size:
        raise VerificationError(f"{path}: llama.cpp {'refused to load it' if n_tokens is None else f'sees {n_tokens} tokens'}"
                                f", expected a vocabulary of {checkpoint.config.vocab_size}")
    return summary


def convert(opts: ConvertOptions) -> ConvertResult:
    quant, out = opts.quant, Path(opts.output)
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: output directory does not exist")
    if out.is_dir():
        raise InputError(f"{out}: is a directory; give the output file name")
    if opts.verify_against_f16 and not quant.needs_llama_quantizer:
        raise InputError(f"--verify-against-f16 compares a quantized file with its F16; --quant {quant.name} has none")
    if not isinstance(opts.model_version, int) or opts.model_version < 1:
        raise InputError(f"--model-version {opts.model_version!r} must be a whole number of at least 1")
    if opts.verify_text is not None and not Path(opts.verify_text).is_file():
        raise InputError(f"{opts.verify_text}: verification text does not exist")

    # 1. every input, before any output
    checkpoint = Checkpoint.open(opts.base_dir)
    adapter = Adapter.open(opts.adapter_dir, checkpoint) if opts.adapter_dir else None
    vocab = load_vocab(Path(opts.base_dir), checkpoint.config.vocab_size)
    template_name, template = load_template(opts.template)
    provenance = Provenance(opts.model_name, checkpoint.config.name, adapter.name if adapter else None,
                            template_name, template, opts.qlora_base)

    plan = tensor_plan(checkpoint, quant.written)
    written_bytes = sum(nbytes for _, _, nbytes in plan) + METADATA_MARGIN
    params = sum(int(np.prod(spec.shape)) for spec, _, _ in plan)
    final_bytes = int(params * quant.bits_per_weight / 8) + METADATA_MARGIN
    _check_disk_space(out.parent, written_bytes + (final_bytes if quant.needs_llama_quantizer else 0))

    _remove_stale_partials(out)
    # Everything is written inside a private folder next to the output.  Removing the folder is the
    # cleanup: llama.cpp's quantizer, which cannot be stopped once called, can no longer create
    # its output in a folder that is gone, so an interrupt never leaves a file behind.
    work = out.with_name(f".{out.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    work.mkdir()
    tmp_final = work / "output.gguf"
    tmp_written = work / "f16.gguf" if quant.needs_llama_quantizer else tmp_final
    kept = None
    if opts.keep_intermediate and quant.needs_llama_quantizer:
        kept = out.with_name(out.name.removesuffix(".gguf") + ".F16.gguf")
    elif opts.keep_intermediate:
        log.warning("--keep-intermediate: %s is written directly, there is no intermediate to keep", quant.name)
    result = ConvertResult(out, manifest_path(out), {}, None, None)  # type: ignore[arg-type]
    hashes = None
    try:
        hashes = InputHashes([(p, "base") for p in checkpoint.files]
                             + [(p, "adapter") for p in (adapter.files if adapter else [])])
        source_bytes = sum(checkpoint.tensors[spec.hf_name][1].nbytes for spec, _, _ in plan)
        with _Phase(result, "merge+write") as phase, phase_bar("merge+write", source_bytes, opts.quiet) as bar:
            written_type = LlamaFileType.MOSTLY_F16 if quant.needs_llama_quantizer else quant.file_type
            write_gguf(tmp_written, checkpoint, adapter, vocab, provenance, quant.written, written_type, bar,
                       qlora_base=opts.qlora_base)
            phase.bytes = source_bytes
        if quant.needs_llama_quantizer:
            from .quantize import quantize

            with _Phase(result, "quantize") as phase, phase_bar("quantize", final_bytes, opts.quiet) as bar:
                quantize(tmp_written, tmp_final, quant, opts.threads, bar)
                phase.bytes = tmp_written.stat().st_size
        gate = None
        if opts.verify_against_f16:
            with _Phase(result, "quality gate"):
                gate = _quality_gate(opts, tmp_written, tmp_final, checkpoint)
        with _Phase(result, "verify"):
            result.summary = _verify(tmp_final, checkpoint, quant)
        total = hashes.total + tmp_final.stat().st_size
        with _Phase(result, "hash") as phase, phase_bar("sha256", total, opts.quiet) as bar:
            model = file_record(tmp_final, progress=bar)
            model["path"] = out.name
            input_records = hashes.result(bar)   # hashed while the merge ran: usually done already
            phase.bytes = total
        _fsync(tmp_final)  # the rename below must never expose a file whose data is not on disk
        result.manifest_data = _manifest(result.summary, model | {"version": opts.model_version}, input_records,
                                         quant, provenance)
        if gate is not None:
            result.manifest_data["quality_gate"] = gate
        write_json_atomic(result.manifest, result.manifest_data)
        os.replace(tmp_final, out)
        if kept is not None:
            os.replace(tmp_written, kept)
            result.intermediate = kept
        _fsync(out.parent)         # the renames themselves survive a power cut
        return result
    except OSError as e:
        if e.filename:             # names its path already: the CLI prints it as one line
            raise
        # a short write (numpy's "N requested and M written") names no file and often no errno
        full = shutil.disk_usage(out.parent).free < METADATA_MARGIN
        raise ResourceError(f"{out.parent}: {'no space left on the device' if full else e.strerror or e} "
                            f"while writing {out.name} ({e}); nothing was kept") from None
    finally:
        if hashes is not None:
            hashes.stop()
        for _ in range(3):         # a file created while the folder was being removed: once more
            shutil.rmtree(work, ignore_errors=True)
            if not work.exists():
                break
        checkpoint.close()
        if adapter:
            adapter.close()


PARTIAL_SUFFIX = ".partial"


def _remove_stale_partials(out: Path) -> None:
    """Remove what a killed run (SIGKILL, the OOM killer, a power cut) left beside ``out``:
    ``.NAME.PID.partial`` whose process is gone, or whose id is ours (in a container, a process id
    comes round again: the run that left it was an earlier one).  A run still going is left alone."""
    for path in out.parent.glob(f".{glob_escape(out.name)}.*{PARTIAL_SUFFIX}"):
        pid = path.name[len(out.name) + 2:-len(PARTIAL_SUFFIX)]
        if not pid.isdigit() or (int(pid) != os.getpid() and _process_alive(int(pid))):
            continue
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        log.warning("removing %s (%.1f MiB) left by an earlier run (process %s) that did not finish",
                    path, size / 2**20, pid)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        pass
    return True


def _quality_gate(opts: ConvertOptions, f16: Path, quantized: Path, checkpoint: Checkpoint) -> dict:
    """KL divergence and top-1 agreement of the quantized file against the F16 on a medical text."""
    import hashlib

    from jee1.datafiles import MEDICAL_TEXT
    from jee1.quality import compare

    if opts.verify_text is not None:
        name, text = str(opts.verify_text), Path(opts.verify_text).read_text(encoding="utf-8")
    else:
        name, text = f"built-in {MEDICAL_TEXT.name}", MEDICAL_TEXT.read_text(encoding="utf-8")
    n_ctx = min(512, checkpoint.config.max_position_embeddings)
    result = compare(f16, quantized, text, n_ctx=n_ctx, threads=opts.threads).as_json()
    gate = {"text": name, "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "n_ctx": n_ctx,
            "max_kl_mean": opts.max_kl, "min_top1": opts.min_top1, **result}
    log.info("quality gate vs F16: mean KL %.4f (max allowed %.4f), top-1 %.1f%% (min %.1f%%)",
             result["kl_mean"], opts.max_kl, 100 * result["top1_agreement"], 100 * opts.min_top1)
    if result["kl_mean"] > opts.max_kl or result["top1_agreement"] < opts.min_top1:
        raise VerificationError(f"{opts.quant.name} fails the quality gate against F16: mean KL "
                                f"{result['kl_mean']:.4f} (max {opts.max_kl}), top-1 agreement "
                                f"{100 * result['top1_agreement']:.1f}% (min {100 * opts.min_top1:.1f}%)")
    return gate


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(summary: GgufSummary, model: dict, inputs: list[dict], quant: QuantType,
              provenance: Provenance) -> dict:
    from jee1.llama_backend import versions

    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            **model,
            "name": provenance.model_name,
            "quant": quant.name,
            "tensor_count": len(summary.tensors),
            "parameter_count": summary.parameter_count,
            "tensor_types": summary.type_counts(),
            "base": provenance.base_name,
            "adapter": provenance.adapter_name,
            "chat_template": provenance.template_name,
            "qlora_base": provenance.qlora_base.as_json() if provenance.qlora_base else None,
        },
        "inputs": inputs,
        "tools": {"jee1": __version__, **versions()},
    }
