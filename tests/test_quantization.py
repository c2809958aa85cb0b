"""Quantized outputs: llama.cpp's Q4_K_M tensor mix, sizes, and distance from F16 on a text."""

import numpy as np
import pytest
import sentencepiece as spm

from conftest import run_convert
from helpers import softmax
from jee1.gguf_info import read_gguf
from test_numerics import TEXT, llama_logits

LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp (llama-quant.cpp): the layers Q4_K_M/Q5_K_M give Q6_K for attn_v and ffn_down."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def expected_q4_k_m_type(name: str, n_layers: int) -> str:
    if name.endswith("norm.weight"):
        return "F32"
    if name == "output.weight":
        return "Q6_K"
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        return "Q6_K" if use_more_bits(int(name.split(".")[1]), n_layers) else "Q4_K"
    return "Q4_K"


def test_q4_k_m_tensor_mix_is_llama_cpps(q4_merged, f16_merged):
    summary = read_gguf(q4_merged.output)
    n_layers = summary.metadata["llama.block_count"]
    mix = summary.tensor_types()
    assert mix == {name: expected_q4_k_m_type(name, n_layers) for name in mix}
    counts = summary.type_counts()
    print("Q4_K_M mix:", {k: v["tensors"] for k, v in counts.items()},
          f"size {q4_merged.output.stat().st_size} B vs F16 {f16_merged.output.stat().st_size} B")
    assert summary.metadata["general.file_type"] == 15
    assert q4_merged.output.stat().st_size < 0.4 * f16_merged.output.stat().st_size


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, tiny_base, tiny_adapter, f16_merged, q4_merged):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    tokens = [sp.bos_id()] + sp.encode(TEXT)
    f16 = llama_logits(f16_merged.output, tokens)
    out = {}
    for quant in LADDER:
        path = q4_merged.output if quant == "Q4_K_M" else run_convert(
            tiny_base, tmp_path_factory.mktemp(quant) / f"tiny.{quant}.gguf", quant, tiny_adapter).output
        logits = llama_logits(path, tokens)
        p, q = softmax(f16), softmax(logits)
        kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
        out[quant] = {"kl_mean": kl.mean(), "kl_max": kl.max(),
                      "top1": np.mean(f16.argmax(-1) == logits.argmax(-1)), "size": path.stat().st_size}
        print(f"{quant:7s} vs F16 over {len(tokens)} positions: mean KL {kl.mean():.4f}, max KL {kl.max():.4f}, "
              f"top-1 agreement {out[quant]['top1']:.1%}, {path.stat().st_size} bytes")
    return out


def test_fewer_bits_move_further_from_f16(ladder):
    kls = [ladder[q]["kl_mean"] for q in LADDER]
    assert kls == sorted(kls)
    sizes = [ladder[q]["size"] for q in LADDER]
    assert sizes == sorted(sizes, reverse=True)


def test_quantized_distributions_stay_bounded(ladder):
    # The tiny model has random Gaussian weights, where Q4_K's ~7% relative weight error bites
    # harder than on a trained Llama-2; bounds are ~1.5x what this build measured.
    assert ladder["Q8_0"]["kl_mean"] < 0.005 and ladder["Q8_0"]["top1"] >= 0.95
    assert ladder["Q6_K"]["kl_mean"] < 0.03 and ladder["Q6_K"]["top1"] >= 0.9
    assert ladder["Q4_K_M"]["kl_mean"] < 0.3 and ladder["Q4_K_M"]["kl_max"] < 0.8
    assert ladder["Q4_K_M"]["top1"] >= 0.6


def test_q4_k_weights_dequantize_close_to_f16(q4_merged, f16_merged):
    import gguf

    f16 = {t.name: t for t in gguf.GGUFReader(f16_merged.output).tensors}
    for t in gguf.GGUFReader(q4_merged.output).tensors:
        if t.tensor_type.name != "Q4_K":
            continue
        deq = gguf.quants.dequantize(t.data, t.tensor_type)
        ref = np.asarray(f16[t.name].data, dtype=np.float32).reshape(deq.shape)
        rel = np.sqrt(np.mean((deq - ref) ** 2) / np.mean(ref ** 2))
        assert rel < 0.08, f"{t.name}: relative RMS error {rel:.3f}"
