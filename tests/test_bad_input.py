"""Every kind of bad input: one clear line naming the file or tensor, a non-zero exit, no output file."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import read_safetensors
from jee1.convert.cli import main as convert_cli
from jee1.convert.safetensors_io import write_safetensors
from jee1.convert.tiny import AdapterSpec, TinySpec, build_adapter


@pytest.fixture
def base(tmp_path, tiny_base):
    return Path(shutil.copytree(tiny_base, tmp_path / "base"))


@pytest.fixture
def adapter(tmp_path, tiny_adapter):
    return Path(shutil.copytree(tiny_adapter, tmp_path / "adapter"))


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def run(base, out_dir, *extra, adapter=None, quant="Q4_K_M"):
    args = [str(base), "-o", str(out_dir / "model.gguf"), "--quant", quant, "--quiet", *extra]
    if adapter is not None:
        args += ["--adapter", str(adapter)]
    return CliRunner().invoke(convert_cli, args)


def assert_refused(result, out_dir, *fragments, code=1):
    assert result.exit_code == code, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("jee1-convert: error: ")
    for fragment in fragments:
        assert fragment in line, line
    assert list(out_dir.iterdir()) == [], "no output, no manifest, no temporary file may remain"


def edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_shard(base, out_dir):
    (base / "model-00002-of-00003.safetensors").unlink()
    assert_refused(run(base, out_dir), out_dir, "model-00002-of-00003.safetensors", "missing")


def test_index_names_a_tensor_the_shard_lacks(base, out_dir):
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = "model-00001-of-00003.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(run(base, out_dir), out_dir, "model.layers.0.mlp.extra_proj.weight", "model-00001-of-00003")


def test_tensor_missing_from_checkpoint(base, out_dir):
    shard = base / "model-00003-of-00003.safetensors"
    tensors = read_safetensors(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    write_safetensors(shard, tensors)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(run(base, out_dir), out_dir, dropped, "missing")


def test_truncated_shard(base, out_dir):
    shard = base / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_refused(run(base, out_dir), out_dir, "model-00001-of-00003.safetensors", "truncated")


def test_adapter_shape_does_not_match_base(base, out_dir, tmp_path):
    wrong = build_adapter(tmp_path / "wrong", TinySpec(intermediate_size=1024), AdapterSpec())
    assert_refused(run(base, out_dir, adapter=wrong), out_dir, "model.layers.0.mlp.down_proj", "do not match the base weight")


def test_nan_after_merge(base, out_dir, adapter):
    path = adapter / "adapter_model.safetensors"
    tensors = read_safetensors(path)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"  # late: fails mid-write
    tensors[key] = tensors[key].copy()
    tensors[key][3, 1] = np.nan
    write_safetensors(path, tensors)
    assert_refused(run(base, out_dir, adapter=adapter), out_dir, "model.layers.1.mlp.down_proj.weight", "NaN or Inf")


def test_overflow_beyond_float16(base, out_dir, tmp_path):
    huge = build_adapter(tmp_path / "huge", TinySpec(), AdapterSpec(b_std=1e6))
    assert_refused(run(base, out_dir, adapter=huge, quant="F16"), out_dir, "exceed the F16 range")


def test_unknown_quant_type(base, out_dir):
    assert_refused(run(base, out_dir, quant="Q3_X"), out_dir, "unknown quant type 'Q3_X'", "Q4_K_M")


def test_unreadable_tokenizer(base, out_dir):
    (base / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
    assert_refused(run(base, out_dir), out_dir, "tokenizer.model", "unreadable")


def test_missing_tokenizer(base, out_dir):
    (base / "tokenizer.model").unlink()
    assert_refused(run(base, out_dir), out_dir, "tokenizer.model", "missing")


def test_missing_config(base, out_dir):
    (base / "config.json").unlink()
    assert_refused(run(base, out_dir), out_dir, "config.json", "missing")


def test_base_of_another_architecture(base, out_dir):
    edit_json(base / "config.json", model_type="mistral", architectures=["MistralForCausalLM"])
    assert_refused(run(base, out_dir), out_dir, "MistralForCausalLM", "supports Llama")


def test_dora_adapter_refused(base, out_dir, adapter):
    edit_json(adapter / "adapter_config.json", use_dora=True)
    assert_refused(run(base, out_dir, adapter=adapter), out_dir, "adapter_config.json", "DoRA")


def test_other_adapter_type_refused(base, out_dir, adapter):
    edit_json(adapter / "adapter_config.json", peft_type="IA3")
    assert_refused(run(base, out_dir, adapter=adapter), out_dir, "peft_type 'IA3'", "LORA")


def test_adapter_weights_outside_target_modules(base, out_dir, adapter):
    edit_json(adapter / "adapter_config.json", target_modules=["q_proj", "v_proj"])
    assert_refused(run(base, out_dir, adapter=adapter), out_dir, "k_proj", "does not select")


def test_target_modules_without_weights(base, out_dir, tmp_path):
    partial = build_adapter(tmp_path / "partial", TinySpec(), AdapterSpec(targets=["q_proj"]))
    edit_json(partial / "adapter_config.json", target_modules=["q_proj", "v_proj"])
    assert_refused(run(base, out_dir, adapter=partial), out_dir, "v_proj", "no LoRA weights")


def test_lora_on_embeddings_refused(base, out_dir, adapter):
    path = adapter / "adapter_model.safetensors"
    tensors = read_safetensors(path)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((8, 512), np.float32)
    write_safetensors(path, tensors)
    assert_refused(run(base, out_dir, adapter=adapter), out_dir, "lora_embedding_A", "not supported")


def test_missing_adapter_weights(base, out_dir, adapter):
    (adapter / "adapter_model.safetensors").unlink()
    assert_refused(run(base, out_dir, adapter=adapter), out_dir, "adapter_model.safetensors", "missing")


def test_bad_template_file(base, out_dir, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    assert_refused(run(base, out_dir, "--template", str(bad)), out_dir, "bad.jinja", "not a valid Jinja template")


def test_unknown_template_name(base, out_dir):
    assert_refused(run(base, out_dir, "--template", "vicuna"), out_dir, "'vicuna'", "medalpaca")


def test_missing_output_directory(base, tmp_path):
    result = CliRunner().invoke(convert_cli, [str(base), "-o", str(tmp_path / "nope" / "m.gguf"), "-q"])
    assert result.exit_code == 1 and "output directory does not exist" in result.output
    assert not (tmp_path / "nope").exists()


def test_usage_error_exits_2(base):
    result = CliRunner().invoke(convert_cli, [str(base)])  # no -o
    assert result.exit_code == 2 and "Missing option '-o'" in result.output
