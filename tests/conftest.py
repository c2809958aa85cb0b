"""Session fixtures: the tiny model, trained and converted once per test run, through the real pipeline."""

from __future__ import annotations

import contextlib
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


@pytest.fixture(scope="session")
def stuck_model(tmp_path_factory, tiny_tokenizer):
    """A broken model that repeats one token ("ididid..."): its answers are looping, so replaced."""
    base = build_checkpoint(tmp_path_factory.mktemp("stuck-base"), TinySpec(stuck_token=300), tokenizer=tiny_tokenizer)
    return run_convert(base, tmp_path_factory.mktemp("stuck") / "stuck.Q4_K_M.gguf", "Q4_K_M").output


def engine_settings(model_path: Path, workdir: Path, **sections):
    """Settings for an engine on ``model_path`` with cache and audit inside ``workdir``."""
    from jee1.edge.settings import Settings

    over = {"model": {"path": str(model_path), "require_protected": False},   # tests run as any user
            "runtime": {"threads": 2, "n_ctx": 1024},
            "cache": {"dir": str(workdir / "cache")}, "audit": {"path": str(workdir / "audit.jsonl")}}
    for section, values in sections.items():
        over.setdefault(section, {}).update(values)
    return Settings.load(overrides=over)


@contextlib.contextmanager
def running_engine(workdir: Path, model_path: Path, **sections):
    from jee1.edge.engine import Engine

    eng = Engine(engine_settings(model_path, workdir, **sections))
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture(scope="session")
def engine(tmp_path_factory, q4_merged):
    with running_engine(tmp_path_factory.mktemp("engine"), q4_merged.output,
                        answer={"max_tokens": 64, "queue_size": 2}) as eng:
        yield eng


@contextlib.contextmanager
def tmpfs(mnt: Path, options: str):
    """A real tmpfs mounted at ``mnt`` with ``options``; the test is skipped, saying why, where
    mounting needs root we lack."""
    import subprocess

    mnt.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 4 MiB tmpfs to fill up."""
    with tmpfs(tmp_path / "small", "size=4m") as mnt:
        yield mnt


@pytest.fixture
def readonly_mount(tmp_path):
    """A real read-only filesystem (large enough that no disk-space check refuses first)."""
    with tmpfs(tmp_path / "readonly", "ro,size=1g") as mnt:
        yield mnt


def fill_up(folder: Path) -> Path:
    """Write a file until the filesystem under ``folder`` is full; return it (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:
        with open(filler, "ab", buffering=0) as f:
            while True:
                f.write(b"\0")
                f.flush()
    except OSError:
        pass
    return filler
