"""README's commands, run as written (in a scratch folder, with the repository's data beside them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_device_commands_on_the_demo_model_run_as_written(tmp_path):
    script = readme_block("Trying the device commands on the demo model")
    # `make demo` is `.venv/bin/jee1 demo` (Makefile); .venv/bin is this interpreter's folder here
    script = script.replace("make demo", ".venv/bin/jee1 -q demo").replace(".venv/bin/", f"{BIN}/")
    (tmp_path / "convert").symlink_to(REPO / "convert")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    out = tmp_path / "demo-out"
    for name in ("jee1.toml", "tiny-sm70.Q4_K_M.gguf", "tiny-sm70.Q4_K_M.gguf.manifest.json.sig", "audit.jsonl",
                 "eval/results.json"):
        assert (out / name).exists(), name
    assert '"requests_served"' in result.stdout or "requests_served" in result.stdout
