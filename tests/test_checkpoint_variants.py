"""Checkpoint variants the converter claims to handle, each checked end to end against the numpy
reference through llama.cpp: BF16 shards, linear RoPE scaling, tied input/output embeddings."""

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from conftest import run_convert
from helpers import as_stored, read_checkpoint, read_safetensors, write_bf16_safetensors
from jee1.convert.safetensors_io import write_safetensors
from jee1.gguf_info import read_gguf
from reference_llama import forward
from test_numerics import LOGIT_ATOL, TEXT, llama_logits


@pytest.fixture
def base(tmp_path, tiny_base):
    return shutil.copytree(tiny_base, tmp_path / "base")


def tokens_of(base):
    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(TEXT)


def assert_matches_reference(gguf_path, base):
    cfg, weights = read_checkpoint(base)
    tokens = tokens_of(base)
    ref = forward(as_stored(weights), cfg, tokens)
    ours = llama_logits(gguf_path, tokens)
    assert np.abs(ours - ref).max() < LOGIT_ATOL
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def edit_config(base, **changes):
    path = base / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_bf16_shards(base, tmp_path):
    for shard in base.glob("*.safetensors"):
        write_bf16_safetensors(shard, {k: v.astype(np.float32) for k, v in read_safetensors(shard).items()})
    result = run_convert(base, tmp_path / "bf16-in.gguf", "F16")
    assert_matches_reference(result.output, base)


def test_linear_rope_scaling(base, tmp_path):
    edit_config(base, rope_scaling={"type": "linear", "factor": 4.0})
    result = run_convert(base, tmp_path / "scaled.gguf", "F16")
    meta = read_gguf(result.output).metadata
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 4.0
    assert_matches_reference(result.output, base)


def test_tied_embeddings(base, tmp_path):
    edit_config(base, tie_word_embeddings=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = base / index["weight_map"].pop("lm_head.weight")
    tensors = dict(read_safetensors(shard))
    del tensors["lm_head.weight"]
    write_safetensors(shard, tensors)
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run_convert(base, tmp_path / "tied.gguf", "F16")
    names = {t.name for t in read_gguf(result.output).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert_matches_reference(result.output, base)


def test_unsupported_rope_scaling_is_refused(base, tmp_path):
    from jee1.errors import InputError

    edit_config(base, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(InputError, match="rope_scaling .* is not supported"):
        run_convert(base, tmp_path / "x.gguf", "F16")
