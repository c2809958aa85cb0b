"""Output handling end to end: atomic rename, interruption, intermediates, disk space, manifest, CLI, logging."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import run_convert
from jee1.convert.cli import main as convert_cli
from jee1.convert.tiny import TinySpec, build_checkpoint
from jee1.edge.cli import main as jee1_cli
from jee1.errors import ResourceError
from jee1.manifest import manifest_path, sha256_file

BIN = Path(sys.executable).parent


def test_manifest_records_every_hash(f16_merged, tiny_base, tiny_adapter):
    data = json.loads(manifest_path(f16_merged.output).read_text())
    model = data["model"]
    assert model["sha256"] == sha256_file(f16_merged.output)
    assert model["size"] == f16_merged.output.stat().st_size
    assert model["quant"] == "F16" and model["tensor_count"] == 21
    spec = TinySpec()
    per_layer = 2 * spec.hidden_size + 2 * spec.hidden_size ** 2 + 2 * spec.hidden_size * 128 \
        + 3 * spec.hidden_size * spec.intermediate_size  # norms, q/o, k/v (2 KV heads x 64), MLP
    assert model["parameter_count"] == 2 * spec.vocab_size * spec.hidden_size + spec.hidden_size \
        + spec.num_hidden_layers * per_layer
    roles = {(r["role"], r["path"]) for r in data["inputs"]}
    for f in tiny_base.iterdir():
        assert ("base", f.name) in roles
    assert ("adapter", "adapter_model.safetensors") in roles
    for record in data["inputs"]:
        root = tiny_base if record["role"] == "base" else tiny_adapter
        assert record["sha256"] == sha256_file(root / record["path"])
    assert set(data["tools"]) >= {"jee1", "llama_cpp_python", "gguf"}


def test_intermediate_removed_unless_kept(tmp_path, tiny_base, tiny_adapter):
    run_convert(tiny_base, tmp_path / "a.gguf", "Q4_K_M", tiny_adapter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "a.gguf.manifest.json"]
    kept = run_convert(tiny_base, tmp_path / "b.gguf", "Q4_K_M", tiny_adapter, keep_intermediate=True)
    assert kept.intermediate == tmp_path / "b.F16.gguf"
    from jee1.gguf_info import read_gguf

    assert read_gguf(kept.intermediate).metadata["general.file_type"] == 1


@pytest.mark.parametrize("quant", ["F16", "BF16"])
def test_keep_intermediate_with_a_direct_quant_writes_just_the_output(tmp_path, tiny_base, quant, caplog):
    result = run_convert(tiny_base, tmp_path / "m.gguf", quant, keep_intermediate=True)
    assert result.intermediate is None and result.output.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.manifest.json"]
    assert "no intermediate to keep" in caplog.text


def test_rerun_replaces_output_atomically(tmp_path, tiny_base):
    out = tmp_path / "m.gguf"
    first = run_convert(tiny_base, out, "Q8_0")
    inode = out.stat().st_ino
    second = run_convert(tiny_base, out, "Q8_0")
    assert out.stat().st_ino != inode  # a new file renamed over the old one, never written in place
    assert first.manifest_data["model"]["sha256"] == second.manifest_data["model"]["sha256"]


@pytest.fixture(scope="module")
def medium_base(tmp_path_factory, tiny_tokenizer):
    spec = TinySpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=2, shards=4)
    return build_checkpoint(tmp_path_factory.mktemp("medium"), spec, tokenizer=tiny_tokenizer)


PHASE_MARKERS = {"merge+write": "merge+write", "quantize": "quantize", "hash": "sha256"}


@pytest.mark.parametrize("phase", list(PHASE_MARKERS))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_leaves_nothing(tmp_path, medium_base, sig, phase):
    """The signal goes in once the run's progress bar says it is in ``phase`` (not after a sleep)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([BIN / "jee1-convert", medium_base, "-o", out_dir / "m.gguf", "--quant", "Q4_K_M",
                             "--threads", "1"], stderr=subprocess.PIPE, env=os.environ | {"COLUMNS": "100"})
    seen = b""
    while PHASE_MARKERS[phase].encode() not in seen:
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, f"the run ended before its {phase} phase: {seen.decode(errors='replace')}"
        seen += chunk
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig if sig == signal.SIGTERM else proc.returncode == 130
    assert list(out_dir.iterdir()) == []


def test_an_interrupt_while_llama_cpp_logs_is_never_lost(f16_merged):
    """Signal handlers often run inside llama.cpp's log callback during a load, where ctypes would
    drop the KeyboardInterrupt; 40 Ctrl-Cs at 0-20 ms into a sequence of loads must all arrive."""
    script = f"""
import os, signal, threading, time
from jee1.llama_backend import vocab_token_count
seen = 0
for i in range(40):
    timer = threading.Timer(0.0005 * (i % 40), lambda: os.kill(os.getpid(), signal.SIGINT))
    try:
        timer.start()
        for _ in range(10):
            vocab_token_count({str(f16_merged.output)!r})
        timer.join()
        time.sleep(0.05)
    except KeyboardInterrupt:
        seen += 1
        timer.join()
print("seen", seen)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "seen 40" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "Exception ignored" not in result.stderr


def test_not_enough_disk_space(small_tmpfs, tiny_base):
    with pytest.raises(ResourceError, match=r"small: .* GiB free, the conversion needs about"):
        run_convert(tiny_base, small_tmpfs / "m.gguf", "Q4_K_M")
    assert list(small_tmpfs.iterdir()) == []


def test_cli_json_summary(tmp_path, tiny_base, tiny_adapter):
    result = CliRunner().invoke(convert_cli, [str(tiny_base), "--adapter", str(tiny_adapter), "-o",
                                              str(tmp_path / "m.gguf"), "--quant", "q4_k_m", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["quant"] == "Q4_K_M" and summary["sha256"] == sha256_file(tmp_path / "m.gguf")
    assert set(summary["phases"]) == {"merge+write", "quantize", "verify", "hash"}
    assert summary["tensor_types"]["Q6_K"]["tensors"] == 3


def test_help_teaches_and_documents_exit_codes():
    text = CliRunner().invoke(convert_cli, ["--help"]).output
    for needle in ("--adapter", "--quant", "Q4_K_M", "--keep-intermediate", "--json", "Exit codes", "medalpaca"):
        assert needle in text


def test_both_commands_print_their_version():
    from jee1 import __version__

    for command in ("jee1-convert", "jee1"):
        done = subprocess.run([str(Path(sys.executable).parent / command), "--version"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == f"{command}, version {__version__}"


def test_llama_cpp_log_goes_through_logging(tmp_path, tiny_base):
    proc = subprocess.run([BIN / "jee1-convert", tiny_base, "-o", tmp_path / "m.gguf", "--quant", "Q4_K_M",
                           "-v"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in re.split(r"[\r\n]+", proc.stderr) if ln.strip()]
    bar = re.compile(r"^(merge\+write|quantize|sha256)\s*:")
    logged = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.\-]+: ")
    stray = [ln for ln in lines if not bar.match(ln) and not logged.match(ln)]
    assert stray == []
    assert any(ln.startswith("DEBUG jee1.llama_cpp: ") and "llama_model_quantize" in ln for ln in lines)


def test_quiet_prints_nothing_on_success(tmp_path, tiny_base):
    proc = subprocess.run([BIN / "jee1-convert", tiny_base, "-o", tmp_path / "m.gguf", "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""


def test_inspect_reports_metadata_and_types(q4_merged):
    result = CliRunner().invoke(jee1_cli, ["inspect", str(q4_merged.output), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    meta = info["metadata"]
    assert meta["general.name"] == "SM70" and meta["general.architecture"] == "llama"
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.attention.head_count"] == 4
    assert meta["tokenizer.ggml.tokens"] == {"array_of": "string", "length": 512}
    assert meta["jee1.template"] == "medalpaca" and not any(k.startswith("general.jee1") for k in meta)
    head_dim = 256 // 4
    assert meta["llama.attention.key_length"] == meta["llama.attention.value_length"] == head_dim
    assert meta["general.quantization_version"] == 2
    assert "### Instruction:" in meta["tokenizer.chat_template"]
    assert info["tensor_types"]["Q4_K"]["tensors"] == 13
    text = CliRunner().invoke(jee1_cli, ["inspect", str(q4_merged.output)]).output
    assert "Q6_K" in text and "general.file_type = 15" in text


def test_inspect_rejects_a_non_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    result = CliRunner().invoke(jee1_cli, ["inspect", str(bad)])
    assert result.exit_code == 1 and "not a readable GGUF" in result.output


def test_parts_install_under_the_jee1_namespace(tmp_path):
    code = "import jee1.convert, jee1.edge, jee1.firmware_bridge\ntry:\n import convert\nexcept ImportError:\n pass\n" \
           "else:\n raise SystemExit('top-level convert importable')\ntry:\n import edge\nexcept ImportError:\n pass\n" \
           "else:\n raise SystemExit('top-level edge importable')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_demo_answers_through_the_pipeline(tmp_path):
    result = CliRunner().invoke(jee1_cli, ["-q", "demo", "--workdir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    answer = data["answer"]
    assert answer["completion_tokens"] > 0 and answer["finish_reason"] in ("complete", "truncated")
    assert answer["cached_tokens"] > 0 and answer["cached_tokens"] < answer["prompt_tokens"]
    assert answer["text"].endswith("qualified clinician.")  # the disclaimer
    assert data["status"]["verified"] == "verified" and data["status"]["quant"] == "Q4_K_M"
    assert Path(data["model"]).is_file() and Path(data["manifest"]).is_file()


def test_shipped_data_folders_are_declared_packages():
    """setuptools warns (and will one day drop the files) when package data sits in a folder that is
    not itself a declared package ("data/*.txt" on the parent); each data folder is a package."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = sorted(tool["package-dir"].items(), key=lambda kv: -len(kv[0]))
    for package, globs in tool["package-data"].items():
        assert package in tool["packages"], package
        assert all("/" not in g for g in globs), (package, globs)
        name, path = next((n, p) for n, p in roots if package == n or package.startswith(n + "."))
        folder = repo / path / Path(*package[len(name):].strip(".").split(".")) if package != name else repo / path
        assert all(list(folder.glob(g)) for g in globs), (package, globs)


def test_stale_partials_of_dead_runs_are_removed(tmp_path, tiny_base, caplog):
    """What a SIGKILLed run left goes, with a warning; a live run's stays."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale_dir = tmp_path / f".m.gguf.{dead}.partial"
    stale_dir.mkdir()
    (stale_dir / "f16.gguf").write_bytes(b"\0" * 4096)
    live = tmp_path / f".m.gguf.{os.getppid()}.partial"     # our parent is alive: a run still going
    live.mkdir()
    other = tmp_path / f".other.gguf.{dead}.partial"        # another output's: not ours to judge
    other.mkdir()
    recycled = tmp_path / f".m.gguf.{os.getpid()}.partial"  # an earlier run whose process id came round again
    recycled.mkdir()
    with caplog.at_level("WARNING"):
        run_convert(tiny_base, tmp_path / "m.gguf", "F16")
    assert not stale_dir.exists() and live.exists() and other.exists()
    assert (tmp_path / "m.gguf").is_file()
    assert f"process {dead}" in caplog.text and "did not finish" in caplog.text


def test_input_digests_hashed_during_the_merge_are_each_files_sha256(f16_merged, tiny_base, tiny_adapter):
    records = f16_merged.manifest_data["inputs"]
    roots = {"base": tiny_base, "adapter": tiny_adapter}
    assert {r["role"] for r in records} == {"base", "adapter"}
    for record in records:
        path = roots[record["role"]] / record["path"]
        assert record["sha256"] == sha256_file(path) and record["size"] == path.stat().st_size


def test_a_disk_that_fills_mid_write_is_exit_3_and_leaves_nothing(tmp_path, medium_base):
    """The disk-space check passes, then another writer fills the disk while the merge writes."""
    from conftest import fill_up, tmpfs

    with tmpfs(tmp_path / "disk", "size=400m") as mnt:
        proc = subprocess.Popen([BIN / "jee1-convert", medium_base, "-o", mnt / "m.gguf", "--quant", "Q4_K_M",
                                 "--threads", "1"], stderr=subprocess.PIPE, env=os.environ | {"COLUMNS": "100"})
        seen = b""
        while b"merge+write" not in seen:
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        filler = fill_up(mnt)
        _, err = proc.communicate(timeout=120)
        err = (seen + err).decode(errors="replace")
        assert proc.returncode == 3, err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "no space left" in errors[0].lower() and str(mnt) in errors[0], err
        assert sorted(mnt.iterdir()) == [filler]


def test_a_file_with_the_old_general_jee1_keys_still_loads_and_inspects(tmp_path, f16_merged):
    """Files written before our keys moved to jee1.*: same tensors, old key names."""
    import gguf
    import numpy as np

    from jee1.gguf_info import read_gguf
    from jee1.llama_backend import vocab_token_count

    reader = gguf.GGUFReader(f16_merged.output)
    old = tmp_path / "old.gguf"
    writer = gguf.GGUFWriter(old, arch="llama")
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name.replace("jee1.", "general.jee1.", 1) if name.startswith("jee1.") else name,
                             value, vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = read_gguf(old).metadata
    assert meta["general.jee1.template"] == "medalpaca" and "jee1.template" not in meta
    assert vocab_token_count(old) == 512
    result = CliRunner().invoke(jee1_cli, ["inspect", str(old)])
    assert result.exit_code == 0 and "general.jee1.template" in result.output
