"""The architecture the folder tree promises: imports run one way, llama-cpp-python's internals in one file."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("jee1", "convert", "edge", "firmware_bridge")
PRIVATE = re.compile(r"\.(_ctx|_model|_requires_eval|input_ids|n_tokens)\b")


def sources(*folders: str):
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_llama_cpp_private_attributes_only_in_llama_backend():
    offenders = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
                 for path in sources(*PACKAGES, "benchmarks") if path.name != "llama_backend.py"
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if PRIVATE.search(line) and not line.lstrip().startswith("#")]
    assert offenders == []


def test_shared_code_lives_in_jee1_and_imports_run_one_way():
    """jee1/ imports none of the parts; the parts never import the test factory for production data;
    the bridge reaches the engine only through its public names."""
    part = re.compile(r"^\s*(from|import) jee1\.(convert|edge|firmware_bridge)\b", re.M)
    for path in sources("jee1"):
        assert not part.search(path.read_text(encoding="utf-8")), path
    for path in sources("convert", "edge", "firmware_bridge"):
        text = path.read_text(encoding="utf-8")
        if path.name not in ("tiny.py", "demo.py"):
            assert not re.search(r"from \.tiny import|from jee1\.convert\.tiny import", text), path
        assert "from jee1.convert.cli import" not in text, path       # configure_logging is jee1.logs
    for path in sources("firmware_bridge"):
        assert not re.search(r"from jee1\.edge\.engine import .*\b(Busy|_\w+)", path.read_text(encoding="utf-8")), path
