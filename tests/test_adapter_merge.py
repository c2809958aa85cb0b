"""The merge follows PEFT: every adapter_config feature, checked tensor by tensor in the written GGUF."""

import logging

import gguf
import numpy as np
import pytest

from conftest import run_convert
from helpers import peft_merge, read_checkpoint
from jee1.convert.tiny import ALL_PROJECTIONS, AdapterSpec, TinySpec, build_adapter

VARIANTS = {
    "plain": AdapterSpec(),
    "rslora": AdapterSpec(use_rslora=True, rank=16, alpha=8),
    "rank_alpha_patterns": AdapterSpec(rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.up_proj": 2},
                                       alpha_pattern={"down_proj": 64}),
    "regex_targets": AdapterSpec(targets=r"model\.layers\.1\.self_attn\.(q|v)_proj"),
    "modules_to_save": AdapterSpec(targets=["q_proj", "o_proj"], modules_to_save=["lm_head"]),
    "fan_in_fan_out": AdapterSpec(fan_in_fan_out=True),
}


def llama_cpp_permute(w, n_head):
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py), written out independently of tensor_map."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in table:
        return table[hf]
    layer, rest = hf.split(".")[2], ".".join(hf.split(".")[3:])
    names = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q",
             "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
             "self_attn.o_proj.weight": "attn_output", "post_attention_layernorm.weight": "ffn_norm",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    return f"blk.{layer}.{names[rest]}.weight"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_written_tensors_equal_the_peft_merge(variant, tmp_path, tiny_base, caplog):
    adapter = build_adapter(tmp_path / "adapter", TinySpec(), VARIANTS[variant])
    with caplog.at_level(logging.WARNING):
        result = run_convert(tiny_base, tmp_path / "m.gguf", "F16", adapter)
    cfg, base = read_checkpoint(tiny_base)
    expected = peft_merge(base, adapter)
    written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(result.output).tensors}
    changed = 0
    for hf, ref in expected.items():
        if "q_proj" in hf:
            ref = llama_cpp_permute(ref, cfg["num_attention_heads"])
        elif "k_proj" in hf:
            ref = llama_cpp_permute(ref, cfg["num_key_value_heads"])
        ours = written[gguf_name(hf)].astype(np.float64).reshape(ref.shape)
        stored = ref.astype(np.float16 if ref.ndim == 2 else np.float32).astype(np.float64)
        np.testing.assert_allclose(ours, stored, rtol=2e-3, atol=2e-4, err_msg=hf)
        changed += not np.allclose(expected[hf], base[hf])
    n_targets = {"regex_targets": 2, "modules_to_save": 2 * 2 + 1}.get(variant, 2 * len(ALL_PROJECTIONS))
    assert changed == n_targets
    if variant == "fan_in_fan_out":
        assert "fan_in_fan_out=true is ignored" in caplog.text


def test_rslora_scale_differs_from_plain(tmp_path, tiny_base):
    """Same A and B; rsLoRA scales by alpha/sqrt(r) instead of alpha/r: the merged weights must differ."""
    plain = build_adapter(tmp_path / "p", TinySpec(), AdapterSpec(rank=16, alpha=8))
    rs = build_adapter(tmp_path / "rs", TinySpec(), AdapterSpec(rank=16, alpha=8, use_rslora=True))
    a = gguf.GGUFReader(run_convert(tiny_base, tmp_path / "p.gguf", "F16", plain).output)
    b = gguf.GGUFReader(run_convert(tiny_base, tmp_path / "rs.gguf", "F16", rs).output)
    t1 = np.asarray(a.get_tensor(3).data, np.float32)
    t2 = np.asarray(b.get_tensor(3).data, np.float32)
    assert not np.allclose(t1, t2)


def test_base_alone_without_adapter(tmp_path, tiny_base):
    result = run_convert(tiny_base, tmp_path / "base.gguf", "F16")
    _, base = read_checkpoint(tiny_base)
    written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(result.output).tensors}
    np.testing.assert_array_equal(written["blk.0.ffn_up.weight"].reshape(768, 256),
                                  base["model.layers.0.mlp.up_proj.weight"].astype(np.float16))
    assert result.manifest_data["model"]["adapter"] is None


def test_bf16_output_rounds_the_merge(tmp_path, tiny_base, tiny_adapter):
    result = run_convert(tiny_base, tmp_path / "m.gguf", "BF16", tiny_adapter)
    _, base = read_checkpoint(tiny_base)
    merged = peft_merge(base, tiny_adapter)["model.layers.1.mlp.down_proj.weight"]
    reader = gguf.GGUFReader(result.output)
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.BF16
    ours = gguf.quants.dequantize(t.data, t.tensor_type).reshape(merged.shape)
    np.testing.assert_allclose(ours, merged, rtol=2 ** -8, atol=1e-6)


def _edit_config(adapter, **changes):
    import json

    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_layers_to_transform_limits_the_targets(tmp_path, tiny_base):
    from jee1.errors import InputError

    adapter = build_adapter(tmp_path / "a", TinySpec(), AdapterSpec(targets=r"model\.layers\.1\..*_proj"))
    _edit_config(adapter, target_modules=ALL_PROJECTIONS, layers_to_transform=[1])
    run_convert(tiny_base, tmp_path / "ok.gguf", "F16", adapter)
    _edit_config(adapter, layers_to_transform=[0])
    with pytest.raises(InputError, match="model.layers.0.* no LoRA weights"):
        run_convert(tiny_base, tmp_path / "bad.gguf", "F16", adapter)


def test_exclude_modules_removes_targets(tmp_path, tiny_base):
    from jee1.errors import InputError

    kept = [p for p in ALL_PROJECTIONS if p != "k_proj"]
    adapter = build_adapter(tmp_path / "a", TinySpec(), AdapterSpec(targets=kept))
    _edit_config(adapter, target_modules=ALL_PROJECTIONS, exclude_modules=["k_proj"])
    run_convert(tiny_base, tmp_path / "ok.gguf", "F16", adapter)
    _edit_config(adapter, exclude_modules=None)
    with pytest.raises(InputError, match="k_proj.* no LoRA weights"):
        run_convert(tiny_base, tmp_path / "bad.gguf", "F16", adapter)
