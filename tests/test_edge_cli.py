"""The device CLI end to end in real processes: ask, serve + status, settings errors, offline."""

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jee1.manifest import manifest_path

BIN = Path(sys.executable).parent


def jee1(*args, **kw):
    return subprocess.run([BIN / "jee1", *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def dirs(tmp_path, q4_merged):
    return ["--model", q4_merged.output, "--cache-dir", tmp_path / "cache", "--audit-log", tmp_path / "audit.jsonl",
            "--ctx", "512", "--threads", "2", "--allow-unprotected"]


def test_ask_streams_an_answer_with_the_disclaimer(dirs):
    proc = jee1("-q", "ask", *dirs, "--max-tokens", "8", "What is the antidote for heparin?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("qualified clinician.") and "[Answer cut short" in proc.stdout


def test_ask_json(dirs):
    proc = jee1("-q", "ask", *dirs, "--max-tokens", "4", "--json", "What is the antidote for heparin?")
    answer = json.loads(proc.stdout)
    assert answer["finish_reason"] == "truncated" and answer["completion_tokens"] == 4
    assert answer["decision"]["red_flag"] is False


def test_ask_red_flag(dirs):
    proc = jee1("-q", "ask", *dirs, "I've swallowed a whole pack of my sleeping pills")
    assert proc.returncode == 0 and proc.stdout.startswith("This sounds like it could be a medical emergency")


def test_ask_refuses_a_tampered_model(tmp_path, q4_merged):
    model = tmp_path / "m.gguf"
    shutil.copy2(q4_merged.output, model)
    shutil.copy2(manifest_path(q4_merged.output), manifest_path(model))
    data = bytearray(model.read_bytes())
    data[-7] ^= 0xFF
    model.write_bytes(bytes(data))
    proc = jee1("-q", "ask", "--model", model, "--cache-dir", tmp_path / "c", "--audit-log", tmp_path / "a", "hi")
    assert proc.returncode == 4 and "sha256" in proc.stderr and "differs from the manifest" in proc.stderr


def test_ask_question_longer_than_the_context(dirs):
    proc = jee1("-q", "ask", *dirs, "aspirin " * 400)
    assert proc.returncode == 1 and "the question is too long" in proc.stderr and proc.stdout == ""


def test_ask_missing_model(tmp_path):
    proc = jee1("-q", "ask", "--model", tmp_path / "none.gguf", "--cache-dir", tmp_path, "hi")
    assert proc.returncode == 1 and "model file does not exist" in proc.stderr


def test_bad_config_file(tmp_path):
    cfg = tmp_path / "jee1.toml"
    cfg.write_text("[runtime]\nkv_typ = 'q8_0'\n")
    proc = jee1("--config", cfg, "-q", "ask", "hi")
    assert proc.returncode == 1 and "unknown setting 'kv_typ'" in proc.stderr
    cfg.write_text("[runtime]\ngpu_layers = 'lots'\n")
    proc = jee1("--config", cfg, "-q", "ask", "hi")
    assert proc.returncode == 1 and "gpu_layers" in proc.stderr


@contextlib.contextmanager
def serving(args, ready_when: Path):
    """`jee1 serve ARGS` in its own process until SIGTERM; yields once ``ready_when`` exists."""
    proc = subprocess.Popen([BIN / "jee1", "-q", "serve", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready_when.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0 and not ready_when.exists()


def test_serve_then_status_then_sigterm(tmp_path, dirs):
    with serving(dirs, tmp_path / "cache" / "status.json") as proc:
        data = json.loads(jee1("status", *dirs, "--json").stdout)
        assert data["service"] == "running" and data["pid"] == proc.pid and data["quant"] == "Q4_K_M"
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["engine_start", "engine_stop"]


def test_serve_with_the_ui_link_on_a_unix_socket(tmp_path, dirs):
    sock = tmp_path / "run" / "ui.sock"
    with serving([*dirs, "--ipc", f"unix://{sock}"], sock):    # the URL form ui-sim takes
        result = jee1("ui-sim", "--port", f"unix://{sock}", "--json", "What is the antidote for heparin?")
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert reply["reason"] in ("truncated", "complete") and reply["text"].endswith("qualified clinician.")
        status = json.loads(jee1("ui-sim", "--port", f"unix://{sock}", "--status", "--json").stdout)
        assert status["requests_served"] >= 1 and status["link_queries"] == 0      # a new connection ...
        assert status["service_queries"] >= 1 and status["service_connections"] >= 2  # ... the service's totals
        text = jee1("ui-sim", "--port", f"unix://{sock}", "--status").stdout
        assert not text.lstrip().startswith("{") and "requests_served" in text      # plain text without --json
    assert not (Path.cwd() / "unix:").exists()


def test_serve_refuses_an_ipc_address_it_cannot_serve_before_loading_the_model(dirs):
    started = time.monotonic()
    result = jee1("serve", *dirs, "--ipc", "tcp://0.0.0.0:9000")
    assert result.returncode == 1 and "only a Unix socket is served here" in result.stderr
    assert time.monotonic() - started < 10


def test_status_without_a_service_loads_the_model(dirs):
    data = json.loads(jee1("-q", "status", *dirs, "--json").stdout)
    assert data["service"] == "not running" and data["offload"] == "cpu" and data["context"] == 512


NO_SOCKETS = """
import sys
opened = []
sys.addaudithook(lambda event, args: opened.append(event) if event.startswith("socket.") else None)
from jee1.edge.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("SOCKET_EVENTS=" + ",".join(opened), file=sys.stderr)
"""


def test_loading_and_answering_open_no_socket(dirs):
    """Python's audit hooks see every socket Python code creates; strace (when present) sees llama.cpp's too."""
    args = ["-q", "ask", *map(str, dirs), "--max-tokens", "8", "What is the antidote for heparin?"]
    proc = subprocess.run([sys.executable, "-c", NO_SOCKETS, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "SOCKET_EVENTS=\n" in proc.stderr or proc.stderr.rstrip().endswith("SOCKET_EVENTS=")
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace not installed: the syscall-level half of this check did not run")
    trace = subprocess.run([strace, "-f", "-qq", "-e", "trace=socket,connect,bind,sendto", "-o", "/dev/stderr",
                            BIN / "jee1", *args], capture_output=True, text=True, timeout=120)
    assert trace.returncode == 0, trace.stderr
    calls = [ln for ln in trace.stderr.splitlines() if any(f"{c}(" in ln for c in ("socket", "connect", "bind", "sendto"))]
    assert calls == []


def test_quiet_and_verbose_work_before_and_after_the_command(tmp_path, tiny_base):
    """-q / -v are accepted in the same places on both commands (real processes)."""
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    for args in (["-q", "safety-check", "--json", "hello"], ["safety-check", "-q", "--json", "hello"],
                 ["-v", "safety-check", "--json", "hello"], ["safety-check", "--json", "-v", "hello"],
                 ["service-key", "fleet", "--out", str(tmp_path / "fleet.key"), "-q"]):   # a sub-group's command
        result = subprocess.run([bin_dir / "jee1", *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (args, result.stderr)
    for position in ("first", "last"):
        out = tmp_path / f"{position}.gguf"
        args = [str(tiny_base), "-o", str(out), "--quant", "F16"]
        args = ["-q", *args] if position == "first" else [*args, "-q"]
        result = subprocess.run([bin_dir / "jee1-convert", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stderr == "", (position, result.stderr)


def test_help_shows_defaults_and_only_the_exit_codes_a_command_returns():
    import subprocess
    import sys
    from pathlib import Path

    jee1 = Path(sys.executable).parent / "jee1"
    help_of = lambda cmd: " ".join(subprocess.run([jee1, cmd, "--help"], capture_output=True, text=True,  # noqa: E731
                                                  check=True).stdout.split())
    ask = help_of("ask")
    assert "Overrides runtime.n_ctx (built-in default: 2048" in ask
    assert "Overrides cache.dir (built-in default: '/var/cache/jee1'" in ask
    assert "4 verification failed" in ask and "5 engine busy" not in ask
    safety = help_of("safety-check")
    assert "Exit codes: 0 success; 1 bad input" in safety and "4 verification failed" not in safety
