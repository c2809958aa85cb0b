"""Every command that writes: a read-only or full folder is one line naming the path and exit 3, in
a real process, with no traceback and nothing half-written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fill_up

BIN = Path(sys.executable).parent


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)


def assert_one_line_exit_3(result: subprocess.CompletedProcess, path_part: str, why: str) -> None:
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and path_part in errors[0] and why in errors[0], result.stderr


def remount_readonly(mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)


def test_convert_into_a_readonly_folder(readonly_mount, tiny_base):
    result = run(BIN / "jee1-convert", tiny_base, "-o", readonly_mount / "m.gguf", "--quant", "F16", "-q")
    assert_one_line_exit_3(result, str(readonly_mount), "Read-only file system")
    assert list(readonly_mount.iterdir()) == []


def test_convert_into_a_full_folder(small_tmpfs, tiny_base):
    filler = fill_up(small_tmpfs)
    result = run(BIN / "jee1-convert", tiny_base, "-o", small_tmpfs / "m.gguf", "--quant", "F16", "-q")
    assert_one_line_exit_3(result, str(small_tmpfs), "GiB free")
    assert sorted(small_tmpfs.iterdir()) == [filler]


def test_keygen_into_a_readonly_folder(readonly_mount):
    result = run(BIN / "jee1", "keygen", "--private", readonly_mount / "k.pem", "--public", readonly_mount / "k.pub")
    assert_one_line_exit_3(result, str(readonly_mount), "Read-only file system")
    assert list(readonly_mount.iterdir()) == []


def test_sign_beside_a_readonly_manifest(small_tmpfs, tmp_path, f16_merged):
    assert run(BIN / "jee1", "keygen", "--private", tmp_path / "k.pem", "--public", tmp_path / "k.pub").returncode == 0
    manifest = small_tmpfs / "m.manifest.json"
    shutil.copy(f16_merged.manifest, manifest)
    remount_readonly(small_tmpfs)
    result = run(BIN / "jee1", "sign", manifest, "--key", tmp_path / "k.pem")
    assert_one_line_exit_3(result, str(small_tmpfs), "Read-only file system")
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["m.manifest.json"]


def test_eval_out_readonly_fails_before_loading_a_model(readonly_mount, tmp_path, f16_merged):
    text = tmp_path / "t.txt"
    text.write_text("Aspirin inhibits cyclooxygenase and so the synthesis of thromboxane. " * 200)
    result = run(BIN / "jee1", "-q", "eval", f16_merged.output, "--reference", f16_merged.output, "--text", text,
                 "--out", readonly_mount / "results", "--cache-dir", tmp_path / "cache",
                 "--audit-log", tmp_path / "audit.jsonl")
    assert_one_line_exit_3(result, str(readonly_mount), "Read-only file system")
    assert list(readonly_mount.iterdir()) == []
    assert not (tmp_path / "cache").exists()      # refused before the model was verified or loaded


def test_demo_into_a_readonly_folder(readonly_mount):
    result = run(BIN / "jee1", "-q", "demo", "--workdir", readonly_mount / "demo")
    assert_one_line_exit_3(result, str(readonly_mount), "Read-only file system")


@pytest.mark.parametrize("command", ["status", "ask"])
def test_cache_folder_readonly(readonly_mount, tmp_path, f16_merged, command):
    """A read-only cache folder: the per-device audit key cannot be created there, and the engine
    will not keep an audit log it cannot key, so it refuses at once with one line (exit 3)."""
    args = ["--cache-dir", readonly_mount / "cache", "--audit-log", tmp_path / "audit.jsonl", "--model",
            f16_merged.output, "--ctx", "512"]
    extra = ["--max-tokens", "4", "What is aspirin?"] if command == "ask" else []
    result = run(BIN / "jee1", "-q", command, *args, *extra)
    assert_one_line_exit_3(result, "audit.key", "Read-only file system")
