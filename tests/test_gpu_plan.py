"""The offload planner on synthetic GGUF headers of 7B, 13B and 70B Llama-2 shapes (sparse files:
real tensor tables, no weights), across memory sizes."""

import gguf
import numpy as np
import pytest

from jee1.edge.gpu_plan import ModelShape, plan_offload, unified_free_bytes
from jee1.gguf_info import read_gguf

GiB = 2**30
Q4_K_BYTES_PER_256 = 144
Q6_K_BYTES_PER_256 = 210
SHAPES = {  # hidden, ffn, layers, heads, kv heads (Llama-2 7B / 13B / 70B)
    "7B": (4096, 11008, 32, 32, 32),
    "13B": (5120, 13824, 40, 40, 40),
    "70B": (8192, 28672, 80, 64, 8),
}


def write_header(path, hidden, ffn, layers, heads, kv_heads, vocab=32000):
    """A Q4_K_M-like GGUF: tensor table and metadata real, data region a hole in a sparse file."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_context_length(4096)
    kv_dim = hidden // heads * kv_heads

    def tensor(name, rows, cols, qtype=gguf.GGMLQuantizationType.Q4_K):
        per = {gguf.GGMLQuantizationType.Q4_K: Q4_K_BYTES_PER_256, gguf.GGMLQuantizationType.Q6_K: Q6_K_BYTES_PER_256}
        nbytes = rows * cols // 256 * per[qtype]
        writer.add_tensor_info(name, (rows, cols // 256 * per[qtype]), np.dtype(np.uint8), nbytes, raw_dtype=qtype)

    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", kv_dim, hidden), ("attn_v", kv_dim, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_gate", ffn, hidden),
                                 ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)):
            tensor(f"blk.{i}.{name}.weight", rows, cols)
    tensor("output.weight", vocab, hidden, gguf.GGMLQuantizationType.Q6_K)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(ti.nbytes for ti in writer.tensors[0].values())
    writer.close()
    with open(path, "r+b") as f:
        start = f.seek(0, 2)
        f.truncate(start + (-start % 32) + total + 4096)   # sparse: no disk used


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = {}
    for name, dims in SHAPES.items():
        path = tmp_path_factory.mktemp(name) / f"{name}.gguf"
        write_header(path, *dims)
        out[name] = ModelShape.from_gguf(read_gguf(path))
    return out


def test_shapes_come_from_the_file(shapes):
    s70 = shapes["70B"]
    assert s70.n_layer == 80 and s70.n_head_kv == 8 and s70.head_dim == 128
    total = sum(s70.layer_bytes) + s70.output_bytes
    assert 36 * GiB < total < 42 * GiB          # ~39 GiB of Q4_K layers: the 41 GB class
    assert shapes["7B"].kv_bytes_per_layer(4096, "f16") == 2 * 4096 * 32 * 128 * 2


@pytest.mark.parametrize("model,free_gib,expected", [
    ("7B", 24, "all"), ("7B", 4, "partial"), ("7B", 1, "partial"), ("7B", 0.5, "cpu"),
    ("13B", 24, "all"), ("13B", 8, "partial"), ("13B", 0.5, "cpu"),
    ("70B", 80, "all"), ("70B", 64, "all"), ("70B", 32, "partial"), ("70B", 16, "partial"), ("70B", 0.5, "cpu"),
])
def test_plan_by_memory(shapes, model, free_gib, expected):
    plan = plan_offload(shapes[model], n_ctx=4096, kv_type="f16", free_bytes=int(free_gib * GiB),
                        reserve_bytes=0, margin_bytes=512 * 2**20)
    assert plan.kind == expected, plan
    assert plan.needed_bytes <= plan.budget_bytes or plan.kind == "cpu"
    if expected == "partial":  # one more layer would not have fit
        s = shapes[model]
        layer = s.layer_bytes[-1] + s.kv_bytes_per_layer(4096, "f16")
        assert plan.needed_bytes + layer > plan.budget_bytes


def test_orin_64gb_keeps_the_reserve(shapes):
    """Jetson AGX Orin 64 GB: unified memory; 70B Q4_K_M fits whole only while the reserve leaves room."""
    s = shapes["70B"]
    roomy = plan_offload(s, 4096, "f16", free_bytes=60 * GiB, reserve_bytes=2 * GiB, margin_bytes=512 * 2**20)
    tight = plan_offload(s, 4096, "f16", free_bytes=60 * GiB, reserve_bytes=24 * GiB, margin_bytes=512 * 2**20)
    assert roomy.kind == "all" and tight.kind == "partial" and tight.gpu_layers < 80


def test_smaller_kv_type_fits_more(shapes):
    s = shapes["70B"]
    f16 = plan_offload(s, 32768, "f16", 44 * GiB, 0, 512 * 2**20)
    q4 = plan_offload(s, 32768, "q4_0", 44 * GiB, 0, 512 * 2**20)
    assert q4.gpu_layers > f16.gpu_layers


def test_no_accelerator_means_cpu(shapes):
    assert plan_offload(shapes["7B"], 4096, "f16", None, 0, 0).kind == "cpu"


def test_unified_memory_reads_memavailable(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemFree:         1000 kB\nMemAvailable:   50000000 kB\n")
    assert unified_free_bytes(meminfo) == 50000000 * 1024


def test_draft_gets_what_the_target_leaves(shapes):
    """SM70 on a 64 GB Orin with a 7B draft: the 70B goes whole first, the 7B in what is left."""
    from jee1.edge.gpu_plan import plan_pair

    t, d = shapes["70B"], shapes["7B"]
    margin = 512 * 2**20
    target, draft = plan_pair(t, d, 4096, "f16", 60 * GiB, 2 * GiB, margin)
    assert target.kind == "all" and draft.kind == "all"
    assert target.needed_bytes + draft.needed_bytes + 2 * margin + 2 * GiB <= 60 * GiB
    alone = plan_offload(t, 4096, "f16", 60 * GiB, 2 * GiB, margin)
    assert target == alone                                    # the draft never costs the target a layer
    # less memory: the target still whole, the draft only partly
    free = alone.needed_bytes + 2 * GiB + 2 * margin + (sum(d.layer_bytes) + d.output_bytes) // 2
    target, draft = plan_pair(t, d, 4096, "f16", free, 2 * GiB, margin)
    assert target.kind == "all" and draft.kind == "partial" and "after the target" in draft.reason
    # the target does not fit whole: the draft stays on the CPU
    target, draft = plan_pair(t, d, 4096, "f16", 32 * GiB, 0, margin)
    assert target.kind == "partial" and draft.kind == "cpu"
    assert plan_pair(t, None, 4096, "f16", 60 * GiB, 0, margin)[1] is None
