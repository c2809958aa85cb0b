"""--qlora-base: the merge into the 4-bit base QLoRA trained against, checked against bitsandbytes,
transformers and peft themselves (CPU builds, the ``test`` extra), and adapter_model.bin."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"      # transformers and peft look nothing up: every file is local
import torch  # noqa: E402
import bitsandbytes.functional as bnb_f
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from conftest import run_convert
from helpers import llama_logits, peft_merge, read_checkpoint, read_safetensors
from jee1.convert import bnb4
from jee1.convert.bnb4 import QloraBase
from jee1.convert.tensor_map import rotary_row_order
from jee1.convert.tiny import AdapterSpec, TinySpec, build_adapter
from jee1.errors import InputError
from jee1.gguf_info import read_gguf

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- the round trip, bit for bit against bitsandbytes -----------------------------------------

def bnb_round_trip(w: np.ndarray, base: QloraBase) -> tuple[np.ndarray, float | None]:
    """bitsandbytes' quantize_4bit / dequantize_4bit on the CPU: (float32 result, its offset)."""
    t = torch.from_numpy(np.ascontiguousarray(w, np.float32)).to(TORCH_DTYPES[base.dtype])
    q, state = bnb_f.quantize_4bit(t, blocksize=base.blocksize, quant_type=base.quant_type,
                                   compress_statistics=base.double_quant)
    cols = w.shape[-1]
    if cols % 16 == 0 and cols % base.blocksize:
        # bitsandbytes' AVX-512 dequantize kernel indexes scales by row (absmax[row * (cols // blocksize) ...]),
        # wrong when a row is not whole blocks; its portable implementation is the reference there.
        absmax = state.absmax
        if state.nested:
            absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
        out = _dequantize_4bit_compute(q.reshape(-1), absmax.float(), state.code, base.blocksize, t.shape, t.dtype)
    else:
        out = bnb_f.dequantize_4bit(q, state)
    offset = float(state.offset) if state.nested else None
    return out.float().numpy().reshape(w.shape), offset


def our_round_trip(w: np.ndarray, base: QloraBase, offset=None) -> np.ndarray:
    matrix = np.array(w, np.float32).reshape(w.shape[0], -1)
    trip = bnb4.TensorRoundTrip(base, matrix.shape)
    trip.observe(matrix.copy())
    trip.finish(offset)
    return trip.apply(matrix, np.arange(matrix.shape[0])).reshape(w.shape)


def assert_same(ours: np.ndarray, theirs: np.ndarray, base: QloraBase) -> None:
    if base.quant_type == "fp4":
        # bitsandbytes itself dequantizes FP4 code 8 to +0.0 or -0.0 depending on the kernel the
        # shape takes; the values are equal, only the sign of zero differs.
        np.testing.assert_array_equal(ours, theirs)
    else:
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_dynamic_code_is_bitsandbytes():
    np.testing.assert_array_equal(bnb4.DYNAMIC_CODE.view(np.uint32),
                                  bnb_f.create_dynamic_map().numpy().view(np.uint32))
    for kind, code in bnb4.CODES_4BIT.items():
        np.testing.assert_array_equal(code, bnb_f.get_4bit_type(kind, device="cpu").numpy())


SHAPES = [(64, 64), (256, 768), (3, 70), (7, 33), (5, 80), (1, 1), (2, 4096)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, True), (64, False), (32, True)])
def test_round_trip_is_bitsandbytes_bit_for_bit(quant_type, dtype, blocksize, double_quant):
    base = QloraBase(quant_type, dtype, blocksize, double_quant)
    rng = np.random.default_rng(blocksize + len(dtype))
    for shape in SHAPES:
        w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        theirs, offset = bnb_round_trip(w, base)
        assert_same(our_round_trip(w, base, offset), theirs, base)
        if double_quant:   # our own offset: the correctly rounded mean, within 2 ulp of torch's
            ours = np.float32(bnb4.mean_f32(bnb4.block_absmax(bnb4.round_to(w.reshape(-1).copy(), dtype), blocksize)))
            assert abs(int(ours.view(np.int32)) - int(np.float32(offset).view(np.int32))) <= 2


def special_weights(dtype: str) -> dict[str, np.ndarray]:
    """Values on every rounding threshold, zero blocks, huge and tiny scales."""
    mid, _ = bnb4._midpoints(bnb4.CODES_4BIT["nf4"])
    fp4_mid, _ = bnb4._midpoints(bnb4.CODES_4BIT["fp4"])
    on_thresholds = np.zeros((4, 64), np.float32)
    on_thresholds[0, 0] = on_thresholds[2, 0] = 1.0                 # absmax 1: x / absmax == x exactly
    on_thresholds[0, 1:16], on_thresholds[2, 1:16] = mid, fp4_mid
    on_thresholds[1, 0], on_thresholds[1, 1:16] = -1.0, -mid
    on_thresholds[3, 0], on_thresholds[3, 1:16] = 1.0, np.nextafter(mid, np.float32(2))
    zeros = np.zeros((6, 70), np.float32)
    zeros[0, :5] = 0.5                                              # zero blocks, a zero partial block
    big = {"fp16": 6e4, "bf16": 1e30, "fp32": 1e30}[dtype]   # (near 3e38 torch's float32 mean overflows)
    tiny = {"fp16": 6e-8, "bf16": 1e-38, "fp32": 1e-44}[dtype]
    rng = np.random.default_rng(7)
    scales = rng.standard_normal((8, 128)).astype(np.float32)
    scales[:4] *= np.float32(big / 4)
    scales[4:] *= np.float32(tiny)
    return {"thresholds": on_thresholds, "zeros": zeros, "all zero": np.zeros((3, 64), np.float32),
            "huge and tiny scales": scales}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_edge_values_are_bitsandbytes_bit_for_bit(quant_type, dtype):
    base = QloraBase(quant_type, dtype, 64, True)
    for name, w in special_weights(dtype).items():
        theirs, offset = bnb_round_trip(w, base)
        assert np.isfinite(theirs).all(), name
        assert_same(our_round_trip(w, base, offset), theirs, base)


def test_rows_in_any_order_give_the_same_round_trip():
    """The writer reads Q and K rows permuted; the result must not depend on the order."""
    base = QloraBase()
    w = (np.random.default_rng(3).standard_normal((48, 40)) * 0.1).astype(np.float32)   # blocks straddle rows
    whole = bnb4.round_trip(w, base)
    trip = bnb4.TensorRoundTrip(base, w.shape)
    step = trip.chunk_rows(5)
    for start in range(0, 48, step):
        trip.observe(w[start:start + step].copy())
    trip.finish()
    order = rotary_row_order(48, 4)
    np.testing.assert_array_equal(trip.apply(w[order].copy(), order), whole[order])


@pytest.mark.parametrize("bad", [dict(quant_type="int4"), dict(dtype="fp8"), dict(blocksize=48), dict(blocksize=0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        QloraBase(**bad)


# ---- in the converter -------------------------------------------------------------------------

DECODER_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    return {t.name: np.array(t.data, dtype=np.float64) for t in GGUFReader(path).tensors}


def test_converter_merges_into_the_round_trip_of_every_decoder_linear(tmp_path, tiny_base):
    """q and v adapted only: every projection is still round-tripped (QLoRA quantized them all);
    embeddings, norms and lm_head are left as they are."""
    adapter = build_adapter(tmp_path / "qv", TinySpec(), AdapterSpec(targets=["q_proj", "v_proj"]))
    base = QloraBase("nf4", "bf16", 64, True)
    result = run_convert(tiny_base, tmp_path / "out.F16.gguf", "F16", adapter, qlora_base=base)
    _, weights = read_checkpoint(tiny_base)
    trips = {k: (bnb_round_trip(v, base)[0].astype(np.float64) if any(p in k for p in DECODER_LINEAR) else v)
             for k, v in weights.items()}
    expected = peft_merge(trips, adapter)
    got = gguf_tensors(result.output)
    heads = {"q_proj": TinySpec().num_attention_heads, "k_proj": TinySpec().num_key_value_heads}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(TinySpec().num_hidden_layers):
        for hf, gg in names.items():
            want = expected[f"model.layers.{layer}.{hf}.weight"]
            proj = hf.split(".")[1]
            if proj in heads:
                want = want[rotary_row_order(want.shape[0], heads[proj])]
            # the offset is ours (correctly rounded), bitsandbytes' may be 2 ulp away: 1e-6 relative
            np.testing.assert_allclose(got[f"blk.{layer}.{gg}.weight"], want.astype(np.float16), rtol=2e-3, atol=1e-4)
            assert np.mean(got[f"blk.{layer}.{gg}.weight"] != weights[f"model.layers.{layer}.{hf}.weight"]) > 0.5
    np.testing.assert_array_equal(got["token_embd.weight"], weights["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["output.weight"], weights["lm_head.weight"])
    assert result.manifest_data["model"]["qlora_base"] == base.as_json()
    meta = read_gguf(result.output).metadata
    assert (meta["jee1.qlora_base"], meta["jee1.qlora_dtype"],
            meta["jee1.qlora_blocksize"], meta["jee1.qlora_double_quant"]) == ("nf4", "bf16", 64, True)


def test_plain_merge_is_recorded_as_none(f16_merged):
    assert f16_merged.manifest_data["model"]["qlora_base"] is None
    assert read_gguf(f16_merged.output).metadata["jee1.qlora_base"] == "none"


@pytest.mark.parametrize("value,dtype", [(np.nan, "bf16"), (np.inf, "bf16"), (1e5, "fp16")])
def test_bad_base_weights_are_refused_with_nothing_written(tmp_path, tiny_base, tiny_adapter, value, dtype):
    """NaN, Inf, or a value float16 cannot hold when the run loaded the base as float16."""
    from helpers import write_bf16_safetensors

    broken = tmp_path / "base"
    shutil.copytree(tiny_base, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = broken / index["weight_map"][name]
    tensors = {k: v.astype(np.float32) for k, v in read_safetensors(shard).items()}
    tensors[name][3, 5] = value
    write_bf16_safetensors(shard, tensors)
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    with pytest.raises(InputError, match=f"up_proj.*NaN or Inf in the input, or beyond the range of --qlora-dtype {dtype}"):
        run_convert(broken, out, "F16", tiny_adapter, qlora_base=QloraBase(dtype=dtype))
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--qlora-base", "int8"], "'int8' is not one of 'none', 'nf4', 'fp4'"),
    (["--qlora-base", "nf4", "--qlora-blocksize", "48"], "block size 48: bitsandbytes accepts 32, 64"),
    (["--qlora-base", "nf4", "--qlora-dtype", "fp8"], "'fp8' is not one of"),
    (["--qlora-dtype", "fp16"], "--qlora-dtype only apply with --qlora-base nf4 or fp4"),
])
def test_cli_refuses_bad_qlora_options_and_writes_nothing(tmp_path, tiny_base, tiny_adapter, args, message):
    from click.testing import CliRunner

    from jee1.convert.cli import main as convert_cli

    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(convert_cli, [str(tiny_base), "--adapter", str(tiny_adapter),
                                              "-o", str(out / "x.gguf"), "--quant", "F16", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert list(out.iterdir()) == []


# ---- end to end: faithful vs plain, against transformers + peft + bitsandbytes -----------------

def _transformers_models(base_dir: Path, adapter_dir: Path):
    """(a) the bitsandbytes-dequantized base with the adapter merged by peft, (b) the QLoRA model
    itself: the base loaded 4-bit by transformers (NF4, double quant, float32 as loaded), peft's
    adapter unmerged, and (c) peft's plain merge into the 16-bit base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, dtype=torch.float32,
                                                     device_map="cpu")
    dequantized = {}
    for name, module in quantized.named_modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # bitsandbytes' CPU fast path multiplies in bfloat16 whatever the compute dtype; the
            # CUDA kernels QLoRA trained with use the compute dtype: so does this reference.
            module.support_avx512bf16_for_cpu = False
            dequantized[name] = bnb_f.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    qlora = PeftModel.from_pretrained(quantized, adapter_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    on_dequantized = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for name, weight in dequantized.items():
        on_dequantized.get_submodule(name).weight.data.copy_(weight)
    merged = PeftModel.from_pretrained(on_dequantized, adapter_dir).merge_and_unload().eval()
    plain = PeftModel.from_pretrained(plain, adapter_dir).merge_and_unload().eval()
    return {"dequantized base, merged": merged, "QLoRA forward": qlora, "plain": plain}


def _agreement(ours: np.ndarray, ref: np.ndarray) -> dict:
    err = np.abs(ours - ref)
    return {"max_logit_error": float(err.max()), "max_error_in_std": float(err.max() / ref.std()),
            "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean())}


def test_faithful_merge_reproduces_the_qlora_model(tmp_path, tiny_base, tiny_adapter, record_property):
    faithful = run_convert(tiny_base, tmp_path / "nf4.F16.gguf", "F16", tiny_adapter,
                           qlora_base=QloraBase("nf4", "fp32", 64, True))
    plain = run_convert(tiny_base, tmp_path / "plain.F16.gguf", "F16", tiny_adapter)
    tokens = [1] + [int(t) for t in np.random.default_rng(5).integers(3, TinySpec().vocab_size, 95)]
    ours = {"faithful": llama_logits(faithful.output, tokens), "plain": llama_logits(plain.output, tokens)}
    with torch.no_grad():
        refs = {name: model(torch.tensor([tokens])).logits[0].double().numpy()
                for name, model in _transformers_models(tiny_base, tiny_adapter).items()}
    figures = {f"{merge} vs {ref}": _agreement(ours[merge], refs[ref])
               for merge in ours for ref in ("dequantized base, merged", "QLoRA forward")}
    figures["transformers: plain vs QLoRA forward"] = _agreement(refs["plain"], refs["QLoRA forward"])
    print(json.dumps(figures, indent=1))
    record_property("qlora_figures", figures)
    for ref in ("dequantized base, merged", "QLoRA forward"):
        good, bad = figures[f"faithful vs {ref}"], figures[f"plain vs {ref}"]
        # llama.cpp's F16 weights and F16 activations against float32 torch: ~0.01 std of error
        assert good["max_error_in_std"] < 0.05 and good["top1_agreement"] >= 0.97
        assert bad["max_error_in_std"] > 10 * good["max_error_in_std"] and bad["top1_agreement"] < 0.9


def test_eval_shows_what_the_choice_changes_in_kl(tmp_path, tiny_base, tiny_adapter, record_property):
    """Both merges at Q4_K_M, then ``jee1 eval FAITHFUL --reference PLAIN --text``: what a user runs."""
    from click.testing import CliRunner

    from jee1.datafiles import MEDICAL_TEXT as CORPUS
    from jee1.edge.cli import main as jee1_cli

    faithful = run_convert(tiny_base, tmp_path / "nf4.Q4_K_M.gguf", "Q4_K_M", tiny_adapter, qlora_base=QloraBase())
    plain = run_convert(tiny_base, tmp_path / "plain.Q4_K_M.gguf", "Q4_K_M", tiny_adapter)
    text = tmp_path / "medical.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8"), encoding="utf-8")
    result = CliRunner().invoke(jee1_cli, ["-q", "eval", str(faithful.output), "--reference", str(plain.output),
                                           "--text", str(text), "--out", str(tmp_path / "eval"), "--ctx", "1024",
                                           "--cache-dir", str(tmp_path / "cache"),
                                           "--audit-log", str(tmp_path / "audit.jsonl"), "--json"])
    assert result.exit_code == 0, result.output
    kl = json.loads(result.output)["kl"]
    print(json.dumps({k: kl[k] for k in ("kl_mean", "kl_p99", "top1_agreement", "tokens_scored")}))
    record_property("qlora_eval_kl", kl)
    assert kl["kl_mean"] > 0.01 and kl["top1_agreement"] < 0.99


# ---- adapter_model.bin -------------------------------------------------------------------------

def test_bin_adapter_converts_like_its_safetensors_twin(tmp_path, tiny_base, tiny_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                                      tiny_adapter)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    # an adapter_config.json as PEFT 0.4 wrote it: none of the fields added since
    config = json.loads((tmp_path / "bin" / "adapter_config.json").read_text())
    old = {k: config[k] for k in ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha",
                                  "lora_dropout", "bias", "target_modules", "fan_in_fan_out", "inference_mode")}
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps(old))
    twin = run_convert(tiny_base, tmp_path / "st.gguf", "F16", tiny_adapter)
    from_bin = run_convert(tiny_base, tmp_path / "bin.gguf", "F16", tmp_path / "bin")
    a, b = gguf_tensors(twin.output), gguf_tensors(from_bin.output)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert ("adapter", "adapter_model.bin") in {(r["role"], Path(r["path"]).name)
                                                 for r in from_bin.manifest_data["inputs"]}


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_zip(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("where", ["top level", "inside the state dict"])
def test_booby_trapped_pickle_is_refused_and_runs_nothing(tmp_path, tiny_base, tiny_adapter, where):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(tiny_adapter / "adapter_config.json", adapter)
    marker = tmp_path / "ran"
    trap = _RunsACommand(marker)
    _torch_zip(adapter / "adapter_model.bin",
               pickle.dumps(trap if where == "top level" else {"base_model.model.x.lora_A.weight": trap}, protocol=2))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"adapter_model\.bin: the pickle asks for (posix|os)\.system"):
        run_convert(tiny_base, out / "x.gguf", "F16", adapter)
    assert not marker.exists()
    assert list(out.iterdir()) == []


def test_the_converter_and_runtime_never_import_torch():
    import subprocess
    import sys

    code = ("import sys, jee1.convert.cli, jee1.convert.pipeline, jee1.convert.writer, jee1.edge.cli; "
            "sys.exit(sorted({'torch', 'bitsandbytes', 'transformers', 'peft'} & set(sys.modules)) != [])")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_not_a_torch_zip_is_a_clear_error(tmp_path, tiny_base, tiny_adapter):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(tiny_adapter / "adapter_config.json", adapter)
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x02}q\x00.")   # a bare pickle: torch.save before 1.6
    with pytest.raises(InputError, match="not a PyTorch zip file"):
        run_convert(tiny_base, tmp_path / "x.gguf", "F16", adapter)
