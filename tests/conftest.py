"""Session fixtures: the tiny model, trained and converted once per test run, through the real pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, tests/reference_llama.py

from jee1.convert.pipeline import ConvertOptions, convert  # noqa: E402
from jee1.convert.quant_types import quant_type  # noqa: E402
from jee1.convert.tiny import AdapterSpec, TinySpec, build_adapter, build_checkpoint, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"), TinySpec().vocab_size)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("base"), TinySpec(), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory) -> Path:
    return build_adapter(tmp_path_factory.mktemp("adapter"), TinySpec(), AdapterSpec())


def run_convert(base: Path, out: Path, quant: str, adapter: Path | None = None, **kw):
    return convert(ConvertOptions(base_dir=base, adapter_dir=adapter, output=out, quant=quant_type(quant),
                                  quiet=True, threads=2, **kw))


@pytest.fixture(scope="session")
def f16_merged(tmp_path_factory, tiny_base, tiny_adapter):
    return run_convert(tiny_base, tmp_path_factory.mktemp("f16") / "tiny.F16.gguf", "F16", tiny_adapter)


@pytest.fixture(scope="session")
def q4_merged(tmp_path_factory, tiny_base, tiny_adapter):
    return run_convert(tiny_base, tmp_path_factory.mktemp("q4") / "tiny.Q4_K_M.gguf", "Q4_K_M", tiny_adapter)
