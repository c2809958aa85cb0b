"""``jee1``: the device CLI."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from jee1 import __version__
from jee1.logs import configure_logging
from jee1.errors import InputError, Jee1Error, ResourceError, exit_codes, os_error_line

EPILOG = exit_codes(1, 2, 3, 4, 5)


def _fail(e: Jee1Error):
    click.echo(f"jee1: error: {e}", err=True)
    sys.exit(e.exit_code)


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe in it: an OSError here is exit 3 before any long work."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".jee1-probe-"):
        pass


class _Commands(click.Group):
    """Every command: an OSError that reaches here (a read-only or full folder, a permission) is
    one line and exit 3, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as e:
            click.echo(f"jee1: error: {os_error_line(e)}", err=True)
            sys.exit(ResourceError.exit_code)


@click.group(cls=_Commands, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="jee1")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Device settings (TOML). Default: /etc/jee1/jee1.toml if present, else built-in defaults.")
@click.option("-v", "--verbose", count=True, help="More log output (llama.cpp's included).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only, no progress bars.")
@click.pass_context
def main(ctx, config_path, verbose, quiet):
    """JEE1 device runtime for SM70, the offline medical question-answering model.

    \b
    jee1 ask "question"        stream an answer (safety policy, warm prompt prefix)
    jee1 serve                 run the engine as a long-lived service
    jee1 status                engine status (from the running service, or a fresh load)
    jee1 safety-check TEXT     run only the safety policy
    jee1 keygen / jee1 sign    Ed25519 keys and manifest signatures (workstation)
    jee1 inspect FILE.gguf     GGUF metadata and tensor types
    jee1 eval MODEL --task ..  MedQA / PubMedQA / USMLE accuracy, KL against the F16
    jee1 demo                  tiny end-to-end demo without the real model
    """
    configure_logging(verbose, quiet)
    ctx.obj = {"quiet": quiet, "verbose": verbose, "config": config_path}


@main.command(epilog=exit_codes(1, 2, 3))
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


@main.command(epilog=exit_codes(1, 2, 3, 4))
# demo-out is git-ignored; README's "Trying the device commands" uses it
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path("demo-out"),
              show_default=True,
              help="Where to build the tiny model, its GGUF, manifest, a development jee1.toml, cache and audit "
                   "log. Kept, so the device commands can be tried on it (README).")
@click.option("--question", default=None, help="The question to ask (default: a fixed anaphylaxis question).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def demo(ctx, workdir, question, as_json):
    """End-to-end demo without the real model: build the tiny Llama-2 checkpoint and LoRA adapter,
    convert them to Q4_K_M, then answer one question through the device engine (manifest check,
    safety policy, chat template from the GGUF, warm prefix, streaming, audit log).

    The tiny model's weights are random, so its answer is noise; every step it runs is the real one.
    """
    from .demo import QUESTION, run_demo

    question = question or QUESTION
    stream = None if as_json else (lambda text: click.echo(text, nl=False))
    if not as_json:
        click.echo(f"question: {question}\nanswer:   ", nl=False)
    try:
        result = run_demo(workdir, question, quiet=ctx.obj["quiet"] or as_json, on_text=stream)
    except Jee1Error as e:
        _fail(e)
    answer = result.answer
    files = {name: str(path.resolve()) for name, path in result.files.items()}
    if as_json:
        click.echo(json.dumps({"model": files["model"], "manifest": files["manifest"], "files": files,
                               "question": question, "answer": answer.as_json(), "status": result.status},
                              indent=2, ensure_ascii=False))
        return
    click.echo(f"\n\nmodel: {result.model.name} (Q4_K_M from the tiny checkpoint + LoRA; random weights, so the"
               f" answer is noise)\nfinish: {answer.finish_reason}, {answer.completion_tokens} tokens, "
               f"{answer.cached_tokens} of {answer.prompt_tokens} prompt tokens from the warm prefix")
    click.echo("files:")
    for name, path in files.items():
        click.echo(f"  {name:<11} {path}")
    click.echo(f"try the device commands on it: jee1 --config {result.files['config']} ask \"...\" (README)")


# -- the engine commands ---------------------------------------------------------------------

@functools.cache
def _defaults() -> dict:
    """edge/data/default_config.toml, read once per process (every engine option's --help quotes it)."""
    from jee1.datafiles import read_toml

    from .settings import DEFAULTS_FILE

    return read_toml(DEFAULTS_FILE, "the default settings")


def _default(key: str):
    """A setting's built-in value, for --help."""
    section, name = key.split(".")
    return _defaults()[section][name]


def _setting_help(text: str, key: str) -> str:
    return f"{text} Overrides {key} (built-in default: {_default(key)!r}; the --config file may change it)."


def engine_options(f):
    """Options that override the settings file for commands that load the model."""
    options = [
        click.option("--model", type=click.Path(path_type=Path, dir_okay=False),
                     help=_setting_help("The GGUF to load; its .manifest.json must be beside it.", "model.path")),
        click.option("--gpu-layers", help=_setting_help("'auto' plans from free accelerator memory; a number offloads "
                                                        "that many layers; 0 runs on the CPU.", "runtime.gpu_layers")),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=16),
                     help=_setting_help("Context length in tokens.", "runtime.n_ctx")),
        click.option("--threads", type=click.IntRange(min=0),
                     help=_setting_help("CPU threads; 0 uses every core.", "runtime.threads")),
        click.option("--kv-type", type=click.Choice(["f32", "f16", "q8_0", "q4_0"]),
                     help=_setting_help("Element type of the KV cache (smaller fits more layers on a GPU).",
                                        "runtime.kv_type")),
        click.option("--batch", type=click.IntRange(min=1),
                     help=_setting_help("Prompt tokens per llama.cpp decode call.", "runtime.batch")),
        click.option("--flash-attn/--no-flash-attn", default=None,
                     help=_setting_help("llama.cpp's flash attention.", "runtime.flash_attn")),
        click.option("--mmap/--no-mmap", default=None,
                     help=_setting_help("Memory-map the model instead of reading it.", "runtime.mmap")),
        click.option("--mlock/--no-mlock", default=None,
                     help=_setting_help("Lock the model in RAM so it is never paged out.", "runtime.mlock")),
        click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False),
                     help=_setting_help("Folder for the warm prompt prefix, the verified-model cache, the audit "
                                        "key and the status file.", "cache.dir")),
        click.option("--audit-log", type=click.Path(path_type=Path, dir_okay=False),
                     help=_setting_help("The audit log (JSON lines, rotated).", "audit.path")),
        click.option("--no-verify", is_flag=True, help="Skip the manifest check (development only; logged)."),
        click.option("--allow-unprotected", is_flag=True,
                     help="Load a model file that someone other than root could write (not root-owned, or "
                          "writable by its group or others; development only; logged). Sets "
                          "model.require_protected = false."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def load_settings(ctx, model=None, gpu_layers=None, n_ctx=None, threads=None, kv_type=None, batch=None,
                  flash_attn=None, mmap=None, mlock=None, cache_dir=None, audit_log=None, no_verify=False,
                  allow_unprotected=False, pre_model_safety=None, **answer):
    from .settings import Settings

    over: dict = {"model": {}, "runtime": {}, "cache": {}, "audit": {}, "answer": {}, "safety": {}}
    if pre_model_safety is not None:
        over["safety"]["pre_model"] = pre_model_safety
    if model:
        over["model"]["path"] = str(model)
    if no_verify:
        over["model"]["verify"] = False
    if allow_unprotected:
        over["model"]["require_protected"] = False
    if gpu_layers is not None:
        over["runtime"]["gpu_layers"] = int(gpu_layers) if gpu_layers.isdigit() else gpu_layers
    for key, value in (("n_ctx", n_ctx), ("threads", threads), ("kv_type", kv_type), ("batch", batch),
                       ("flash_attn", flash_attn), ("mmap", mmap), ("mlock", mlock)):
        if value is not None:
            over["runtime"][key] = value
    if cache_dir:
        over["cache"]["dir"] = str(cache_dir)
    if audit_log:
        over["audit"]["path"] = str(audit_log)
    over["answer"].update({k: v for k, v in answer.items() if v is not None})
    return Settings.load(ctx.obj["config"], {k: v for k, v in over.items() if v})


@main.command(epilog=exit_codes(1, 2, 3, 4))
@click.argument("question")
@engine_options
@click.option("--max-tokens", type=click.IntRange(min=1), help="Limit of generated tokens (answer.max_tokens).")
@click.option("--deadline", "deadline_s", type=click.FloatRange(min=0, min_open=True), help="Seconds (answer.deadline_s).")
@click.option("--json", "as_json", is_flag=True, help="Print the final answer and its record as JSON, no streaming.")
@click.pass_context
def ask(ctx, question, max_tokens, deadline_s, as_json, **engine_opts):
    """Answer one QUESTION, streaming the text as the model produces it.

    The safety policy runs first: an emergency happening now gets the fixed emergency message
    without calling the model (exit 0, finish reason 'safety').
    """
    from .service import open_engine

    try:
        settings = load_settings(ctx, **engine_opts, max_tokens=max_tokens, deadline_s=deadline_s)
        with open_engine(settings, ctx.obj["quiet"] or as_json) as engine:
            request = engine.submit(question)
            try:
                for text in request:
                    if not as_json:
                        click.echo(text, nl=False)
            except KeyboardInterrupt:
                request.cancel()
                request.result()
                click.echo("\n[cancelled]", err=True)
                sys.exit(130)
            answer = request.answer
    except Jee1Error as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(answer.as_json(), indent=2, ensure_ascii=False))
    elif answer.finish_reason != "error":
        click.echo()
    if answer.finish_reason == "error":
        click.echo(f"jee1: error: {answer.text}", err=True)
        sys.exit(1)


@main.command(epilog=exit_codes(1, 2, 3, 4))
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status(ctx, as_json, **engine_opts):
    """Print the engine's status: model, hash, quant, layers on GPU, context, memory, counters.

    Reads the running service's status file (``cache.dir``/status.json) when `jee1 serve` is up;
    otherwise loads the model to report it.
    """
    from .service import open_engine, read_status

    try:
        settings = load_settings(ctx, **engine_opts)
        data = read_status(settings)
        if data is None:
            with open_engine(settings, True) as engine:
                data = engine.status() | {"service": "not running"}
    except Jee1Error as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        click.echo(f"{key:<24} {value}")


@main.command(epilog=exit_codes(1, 2, 3, 4))
@engine_options
@click.option("--ui-port", "ui_ports", multiple=True, metavar="URL",
              help="Serial line to the UI firmware: a device (/dev/ttyS1) or a pyserial URL (loop://, "
                   "socket://host:port). Reopened with backoff when it disappears. Repeatable.")
@click.option("--baud", "baudrate", type=int, default=115200, show_default=True, help="Baud rate of the serial ports.")
@click.option("--ipc", metavar="PATH", help="Unix socket for a UI on the same machine (mode 0660): /run/jee1/ui.sock "
                                          "or unix:///run/jee1/ui.sock.")
@click.option("--console-port", metavar="URL", help="Serial port of the technician console.")
@click.option("--console-secret", metavar="FILE", default="/etc/jee1/service.key", show_default=True,
              help="The device's service secret for console logins.")
@click.pass_context
def serve(ctx, ui_ports, baudrate, ipc, console_port, console_secret, **engine_opts):
    """Run the engine as a long-lived service until SIGTERM or Ctrl-C.

    Loads and verifies the model once, restores the warm prompt prefix, serves the UI link
    (docs/protocol.md) on --ui-port and --ipc, the technician console on --console-port, and keeps a
    status file (``cache.dir``/status.json) current for `jee1 status`.
    """
    from jee1.firmware_bridge.transports import ipc_path

    from .service import run_service

    try:
        ipc = ipc_path(ipc) if ipc is not None else None     # before the model is loaded
        run_service(load_settings(ctx, **engine_opts), quiet=ctx.obj["quiet"], ui_ports=ui_ports,
                    baudrate=baudrate, ipc=ipc, console_port=console_port, console_secret=console_secret)
    except Jee1Error as e:
        _fail(e)


@main.command("ui-sim", epilog=exit_codes(1, 2, 3))
@click.option("--port", required=True, metavar="URL",
              help="The bridge: unix:///run/jee1/ui.sock, a serial device, or a pyserial URL.")
@click.option("--baud", "baudrate", type=int, default=115200, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=0, max=65535), default=0, help="0: the device default.")
@click.option("--status", "want_status", is_flag=True, help="Ask for the engine status instead of a question.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply and link figures as JSON.")
@click.argument("question", required=False)
def ui_sim(port, baudrate, max_tokens, want_status, as_json, question):
    """Reference UI client: HELLO, QUERY, stream the answer (RESEND on gaps, ACKs), DONE.

    What the UI firmware does, in Python: for tests, demos and technicians checking a link.
    """
    import socket

    from jee1.firmware_bridge.transports import SerialTransport, SocketTransport, TransportClosed, unix_path
    from jee1.firmware_bridge.ui_sim import LinkError, UIClient

    if not want_status and not question:
        raise click.UsageError("give a QUESTION, or --status")
    try:
        path = unix_path(port)
        if path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
            except OSError as e:
                raise TransportClosed(f"{path}: {e.strerror}") from None
            transport = SocketTransport(sock, port)
        else:
            transport = SerialTransport(port, baudrate)
        client = UIClient(transport)
        client.hello()
        if want_status:
            status = client.status()
            if as_json:
                click.echo(json.dumps(status, indent=2))
            else:
                for key, value in status.items():
                    click.echo(f"{key:<28} {value}")
            return
        echo = None if as_json else (lambda t: click.echo(t, nl=False))
        withdrawn = None if as_json else (lambda: click.echo("\n[the text above is withdrawn; replaced by:]\n", nl=False))
        reply = client.ask(question, max_tokens, on_text=echo, on_restart=withdrawn)
    except (TransportClosed, LinkError, TimeoutError) as e:
        click.echo(f"jee1: error: {e}", err=True)
        sys.exit(3)
    if as_json:
        click.echo(json.dumps({"text": reply.text, "reason": reply.reason.name.lower(), "tokens": reply.tokens,
                               "replaced": reply.replaced, "discarded": reply.discarded, "safety_kind": reply.safety_kind,
                               "resends": reply.resends,
                               "bad_frames": reply.bad_frames},
                              indent=2, ensure_ascii=False))
    else:
        click.echo(f"\n[{reply.reason.name.lower()}, {reply.tokens} tokens, {reply.resends} resends]")


@main.command("safety-check", epilog=exit_codes(1, 2, 3))
@click.argument("texts", nargs=-1)
@click.option("--rules", type=click.Path(path_type=Path, dir_okay=False), help="Rules file (default: safety.rules).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per input: red_flag, kind, rule, category, matched, message, rules_version.")
@click.option("--explain", is_flag=True,
              help="Also show why: the message as the screen read it, spelling corrections, every candidate match "
                   "and the context (negation, past, knowledge question, ...) that silenced it, and the learned model's view: "
                   "its score (the mean of its two urgent heads, and each head's), the score of the evidence of every rule "
                   "that fired, read alone, and whether it overruled the rule.")
@click.pass_context
def safety_check(ctx, texts, rules, as_json, explain):
    """Run only the pre-model safety screen (the rules and the screen's learned model, not the
    language model) on each TEXT, or on each line of stdin.

    \b
    RED FLAG emergency   an emergency happening now: the fixed emergency message
    RED FLAG crisis      self-harm intent: the crisis message
    NOTICE               mostly not English: the English-only notice
    ok                   the model would answer

    For clinical reviewers auditing the rules (docs/safety.md). Exit 0 whatever the decisions.
    """
    from .safety import Decision, SafetyPolicy
    from .settings import Settings

    try:
        safety = Settings.load(ctx.obj["config"])["safety"] | ({"rules": str(rules)} if rules else {})
        policy = SafetyPolicy.from_settings(safety | {"pre_model": True})
    except Jee1Error as e:
        _fail(e)
    inputs = list(texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for text in inputs:
        why = policy.explain(text) if explain else None
        d = Decision(**why["decision"]) if why else policy.check(text)    # screened once either way
        if as_json:
            click.echo(json.dumps({"text": text, **d.as_json(), **({"explain": why} if why else {})}, ensure_ascii=False))
            continue
        verdict = f"RED FLAG {d.kind} {d.rule}" if d.red_flag else "NOTICE not English" if d.short_circuit else "ok"
        click.echo(f"{verdict:<50} {text}")
        if why:
            click.echo(f"    read as: {why['canonical']}")
            if why["corrections"]:
                click.echo("    spelling: " + ", ".join(f"{a} -> {b}" for a, b in why["corrections"].items()))
            overruled = why["learned"] and why["learned"]["overruled"]
            for c in why["candidates"]:
                silenced = ", ".join(c["suppressed_by"]) or ("FIRED, overruled" if c["rule"] == overruled else "FIRED")
                click.echo(f"    {c['rule']:<42} {c['matched']!r}: {silenced}")
            if why["learned"]:
                lp = why["learned"]
                towards = "ordinary" if lp["overruled"] else "urgent"
                linear, hidden = lp["p_urgent_heads"]
                click.echo(f"    learned model: p(urgent) {lp['p_urgent']:.3f}, the mean of its linear head's {linear:.3f} and "
                           f"its hidden layer's {hidden:.3f} (fires at {lp['threshold']:.2f}, overrules a rule when both "
                           f"are below {lp['overrule_below']:.2f}), p(crisis) {lp['p_crisis']:.3f}; strongest towards "
                           f"{towards}: {', '.join(lp['top_features']) or '-'}")
                if len(why["fired"]) > 1:
                    click.echo(f"    rules that fired: {', '.join(why['fired'])}")
                if lp["p_urgent_evidence"] is not None:
                    click.echo(f"    the evidence of every rule that fired (its clause up to the match, and its second "
                               f"findings'), read alone: p(urgent) {lp['p_urgent_evidence']:.3f} (the higher head)")
                if lp["overruled"]:
                    click.echo(f"    OVERRULED {lp['overruled']}: the learned model is all but sure this is an ordinary message, "
                               "read whole and its evidence alone")


@main.command(epilog=exit_codes(1, 2, 3))
@click.option("--private", "private_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the private key (PEM, mode 0600). Keep it on the workstation.")
@click.option("--public", "public_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the public key (PEM), for the devices' model.trusted_keys.")
def keygen(private_path, public_path):
    """Create an Ed25519 key pair for signing model manifests."""
    from .model_check import generate_keypair

    try:
        kid = generate_keypair(private_path, public_path)
    except Jee1Error as e:
        _fail(e)
    click.echo(f"key {kid}: private {private_path}, public {public_path}")


@main.command(epilog=exit_codes(1, 2, 3))
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--key", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Private key from `jee1 keygen`.")
def sign(manifest, key):
    """Sign MANIFEST (a model's .manifest.json): writes MANIFEST.sig next to it.

    Devices with trusted_keys configured refuse models whose manifest is unsigned or signed by
    another key.
    """
    from .model_check import sign_manifest

    try:
        out = sign_manifest(manifest, key)
    except Jee1Error as e:
        _fail(e)
    click.echo(f"wrote {out}")


@main.command("eval", epilog=exit_codes(1, 2, 3, 4))
@click.argument("model_file", metavar="MODEL", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--task", "tasks", type=(click.Choice(["medqa", "pubmedqa", "usmle"]), click.Path(path_type=Path)),
              multiple=True, help="A benchmark and its local file (repeatable): medqa FILE.jsonl, pubmedqa FILE.json, "
                                  "usmle FILE.jsonl (layouts in docs/eval.md).")
@click.option("--mode", type=click.Choice(["loglik", "generate"]), default="loglik", show_default=True,
              help="loglik: score each option's continuation (as evaluation harnesses do); generate: let the "
                   "model answer and parse the letter / yes-no-maybe strictly (unparseable counts as wrong).")
@click.option("--style", type=click.Choice(["harness", "chat"]), default="harness", show_default=True,
              help="harness: lm-evaluation-harness's medqa_4options / pubmed_qa layouts (comparable with published "
                   "figures); chat: the model's own chat template with the device preamble.")
@click.option("--fewshot", type=(click.Choice(["medqa", "pubmedqa", "usmle"]), click.Path(path_type=Path)),
              multiple=True, help="Few-shot examples for a task, from a separate file in the same format.")
@click.option("-k", "--shots", "k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Few-shot examples per question (published comparison figures are five-shot).")
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of the few-shot draw.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N questions of each task.")
@click.option("--strict", is_flag=True, help="A malformed row fails the run (default: reported and skipped).")
@click.option("--pre-model-safety/--no-pre-model-safety", default=False, show_default=True,
              help="Keep the device's red-flag short-circuit on (off by default: the model itself is measured; "
                   "the results say which).")
@click.option("--reference", type=click.Path(path_type=Path, dir_okay=False),
              help="Reference GGUF (the F16): with --text, KL divergence/top-1/perplexity of MODEL against it; "
                   "with --task, both are evaluated and compared question by question (McNemar).")
@click.option("--text", "text_file", type=click.Path(path_type=Path, dir_okay=False),
              help="A text for the KL-divergence quality gate (needs --reference).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("eval-results"),
              show_default=True, help="Results, per-question records (resumable), report.md, accuracy.png.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout.")
@engine_options
@click.pass_context
def eval_(ctx, model_file, tasks, mode, style, fewshot, k, seed, limit, strict, pre_model_safety, reference,
          text_file, out_dir, as_json, **engine_opts):
    """Measure MODEL on MedQA-USMLE, PubMedQA and the USMLE sample exam, on the device's engine code,
    and/or its distance from a reference GGUF.

    \b
      jee1 eval sm70.Q4_K_M.gguf --task medqa test.jsonl --fewshot medqa train.jsonl -k 5
      jee1 eval sm70.Q4_K_M.gguf --reference sm70.F16.gguf --text medical.txt
      jee1 eval sm70.Q4_K_M.gguf --reference sm70.F16.gguf --task pubmedqa ori_pqal.json

    Re-running with the same --out resumes from the per-question records.
    """
    from jee1.quality import compare

    from .engine import Engine
    from .eval import report
    from .eval.prompting import FewshotSampler
    from .eval.runner import EvalConfig, evaluate, read_records
    from .eval.tasks import read_task

    try:
        if engine_opts.get("model") is not None:
            raise InputError(f"--model {engine_opts['model']} and MODEL {model_file}: give the model once, as MODEL")
        if text_file and not reference:
            raise InputError("--text needs --reference (the F16 to compare against)")
        if not tasks and not (reference and text_file):
            raise InputError("nothing to do: give --task, or --reference with --text")
        missing = {t for t, _ in tasks} - {t for t, _ in fewshot} if k else set()
        if missing:
            raise InputError(f"{k}-shot needs --fewshot files for: {', '.join(sorted(missing))}")
        for path in [model_file, *([reference] if reference else []), *([text_file] if text_file else []),
                     *(p for _, p in tasks), *(p for _, p in fewshot)]:
            if not Path(path).is_file():
                raise InputError(f"{path}: no such file")
        for task, path in tasks:     # the task files parse, and hold enough few-shot examples
            items = read_task(task, path, strict).items
            if k:
                FewshotSampler(read_task(task, dict(fewshot)[task], strict).items, k, seed,
                               Path(dict(fewshot)[task]).resolve() == Path(path).resolve())
            if not items:
                raise InputError(f"{path}: no {task} questions in it")
        _check_writable(out_dir)     # before a model is hashed or loaded: a typo costs a second
        config = EvalConfig(list(tasks), out_dir, mode, style, dict(fewshot), k, seed, strict, limit,
                            quiet=ctx.obj["quiet"] or as_json)
        runs, records = [], []
        for label, path in ([("reference", reference)] if reference and tasks else []) + ([("model", model_file)] if tasks else []):
            settings = load_settings(ctx, **(engine_opts | {"model": path}), pre_model_safety=pre_model_safety)
            with Engine(settings) as engine:
                runs.append(evaluate(engine, config, label))
            records.append(read_records(out_dir / runs[-1]["records"], runs[-1]["run_key"]))
        comparison = report.paired(records[0], records[1]) if len(records) == 2 else None
        divergence = None
        if reference and text_file:
            try:
                text = text_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"{text_file}: cannot read the text ({e})") from None
            divergence = compare(reference, model_file, text, n_ctx=engine_opts.get("n_ctx") or 512,
                                 threads=engine_opts.get("threads") or 2).as_json()
        out_dir.mkdir(parents=True, exist_ok=True)
        results = report.write(out_dir, runs, comparison, divergence)
    except Jee1Error as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        click.echo((out_dir / "report.md").read_text())
        click.echo(f"results: {out_dir / 'results.json'}")


@main.command("service-response", epilog=exit_codes(1, 2, 3))
@click.option("--fleet-key", type=click.Path(path_type=Path, dir_okay=False),
              help="The fleet key (jee1 service-key fleet), on the technician's laptop; needs --serial.")
@click.option("--serial", help="The device's serial number (on its label), with --fleet-key.")
@click.option("--secret", "secret_path", type=click.Path(path_type=Path, dir_okay=False),
              help="A device's own service secret instead of --fleet-key/--serial.")
@click.argument("challenge")
def service_response(fleet_key, serial, secret_path, challenge):
    """Compute the technician console's login response to CHALLENGE:
    HMAC-SHA256(device secret, challenge), hex.  The device secret is derived from the fleet key
    and the device's serial (docs/service.md), or read from --secret.

    \b
      jee1 service-response --fleet-key ~/jee1-fleet.key --serial JEE1-000123 3f9c...
    """
    from jee1.firmware_bridge.console import device_secret, load_secret, response_for

    try:
        if bool(fleet_key) == bool(secret_path) or bool(fleet_key) != bool(serial):
            raise InputError("give --fleet-key with --serial, or --secret")
        secret = device_secret(load_secret(fleet_key), serial) if fleet_key else load_secret(secret_path)
        click.echo(response_for(secret, challenge))
    except Jee1Error as e:
        _fail(e)


@main.group("service-key", epilog=exit_codes(1, 2, 3))
def service_key():
    """Make the console's service secrets: one fleet key in the workshop, one secret per device
    derived from it and the device's serial (docs/service.md)."""


@service_key.command("fleet", epilog=exit_codes(1, 2, 3))
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the fleet key (mode 0600). Keep it off the devices.")
def service_key_fleet(out):
    """Create a fleet key: 32 random bytes, hex."""
    import secrets as random_bytes

    from jee1.firmware_bridge.console import write_secret

    try:
        write_secret(out, random_bytes.token_hex(32).encode())
    except Jee1Error as e:
        _fail(e)
    click.echo(f"wrote {out} (mode 0600): keep it on the workshop machine and technicians' laptops only")


@service_key.command("device", epilog=exit_codes(1, 2, 3))
@click.option("--fleet-key", required=True, type=click.Path(path_type=Path, dir_okay=False), help="The fleet key.")
@click.option("--serial", required=True, help="The device's serial number.")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the device's secret (mode 0600), e.g. /etc/jee1/service.key on the device.")
def service_key_device(fleet_key, serial, out):
    """Write one device's service secret, derived from the fleet key and its serial."""
    from jee1.firmware_bridge.console import device_secret, load_secret, write_secret

    try:
        write_secret(out, device_secret(load_secret(fleet_key), serial))
    except Jee1Error as e:
        _fail(e)
    click.echo(f"wrote {out} (mode 0600) for device {serial}")


def _verbosity_after_the_command(ctx, param, value):
    """-q / -v given after the command name (``jee1 eval -q``) mean what they mean before it."""
    if not value:
        return
    root = ctx.find_root()
    root.obj["quiet"] = root.obj["quiet"] or param.name == "late_quiet"
    root.obj["verbose"] = root.obj.get("verbose", 0) + (value if param.name == "late_verbose" else 0)
    configure_logging(root.obj["verbose"], root.obj["quiet"])


def _leaf_commands(group: click.Group):
    for command in group.commands.values():
        yield from _leaf_commands(command) if isinstance(command, click.Group) else (command,)


for _command in _leaf_commands(main):        # the same -q / -v in both places, on every command
    _command.params += [
        click.Option(["-v", "--verbose", "late_verbose"], count=True, expose_value=False, is_eager=True,
                     callback=_verbosity_after_the_command, help="More log output (also accepted before the command)."),
        click.Option(["-q", "--quiet", "late_quiet"], is_flag=True, expose_value=False, is_eager=True,
                     callback=_verbosity_after_the_command, help="Warnings and errors only (also before the command)."),
    ]
