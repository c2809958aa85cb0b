"""How many layers to offload (``--gpu-layers auto``), planned from the GGUF and free memory.

llama.cpp offloads the last ``n`` repeating layers; ``n_layer + 1`` also moves the output layer.
An offloaded layer costs its weights plus its slice of the KV cache; the token embedding stays on
the CPU.  What must fit:  sum(layers) + KV(layers) + [output] + compute margin  <=  free - reserve.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from jee1.gguf_info import GgufSummary

log = logging.getLogger(__name__)

KV_BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
_BLOCK = re.compile(r"blk\.(\d+)\.")
OUTPUT_TENSORS = ("output.weight", "output_norm.weight")


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head_kv: int
    head_dim: int
    layer_bytes: tuple[int, ...]   # weights of each repeating layer
    output_bytes: int              # output norm + output projection

    @classmethod
    def from_gguf(cls, summary: GgufSummary) -> "ModelShape":
        meta = summary.metadata
        arch = meta["general.architecture"]
        n_layer = meta[f"{arch}.block_count"]
        n_head = meta[f"{arch}.attention.head_count"]
        layers = [0] * n_layer
        output = 0
        for t in summary.tensors:
            m = _BLOCK.match(t.name)
            if m:
                layers[int(m.group(1))] += t.n_bytes
            elif t.name in OUTPUT_TENSORS:
                output += t.n_bytes
        return cls(n_layer, meta.get(f"{arch}.attention.head_count_kv", n_head),
                   meta[f"{arch}.embedding_length"] // n_head, tuple(layers), output)

    def kv_bytes_per_layer(self, n_ctx: int, kv_type: str) -> int:
        return int(2 * n_ctx * self.n_head_kv * self.head_dim * KV_BYTES_PER_ELEMENT[kv_type])


@dataclass(frozen=True)
class Plan:
    gpu_layers: int      # the value for llama.cpp's n_gpu_layers
    total_layers: int    # n_layer + 1 (the output layer)
    needed_bytes: int
    budget_bytes: int
    reason: str

    @property
    def kind(self) -> str:
        if self.gpu_layers == 0:
            return "cpu"
        return "all" if self.gpu_layers >= self.total_layers else "partial"


def plan_offload(shape: ModelShape, n_ctx: int, kv_type: str, free_bytes: int | None,
                 reserve_bytes: int, margin_bytes: int) -> Plan:
    total = shape.n_layer + 1
    if free_bytes is None:
        return Plan(0, total, 0, 0, "no accelerator memory found")
    budget = free_bytes - reserve_bytes - margin_bytes
    kv = shape.kv_bytes_per_layer(n_ctx, kv_type)
    everything = sum(shape.layer_bytes) + shape.n_layer * kv + shape.output_bytes
    if everything <= budget:
        return Plan(total, total, everything, budget, "all layers and the output layer fit")
    used, count = 0, 0
    for layer_bytes in reversed(shape.layer_bytes):  # llama.cpp offloads from the last layer down
        if used + layer_bytes + kv > budget:
            break
        used += layer_bytes + kv
        count += 1
    reason = f"{count} of {shape.n_layer} layers fit" if count else "not even one layer fits"
    return Plan(count, total, used, max(budget, 0), reason)


def plan_pair(target: ModelShape, draft: ModelShape | None, n_ctx: int, kv_type: str, free_bytes: int | None,
              reserve_bytes: int, margin_bytes: int) -> tuple[Plan, Plan | None]:
    """The target placed first; a draft model gets what is left (its KV cache included) only when
    the whole target is on the accelerator: a target layer there is worth more than a draft layer."""
    plan = plan_offload(target, n_ctx, kv_type, free_bytes, reserve_bytes, margin_bytes)
    if draft is None:
        return plan, None
    if plan.kind != "all":
        return plan, Plan(0, draft.n_layer + 1, 0, 0, "the target needs all accelerator memory: draft on the CPU")
    left = free_bytes - plan.needed_bytes - margin_bytes   # the target's scratch; the draft gets its own
    draft_plan = plan_offload(draft, n_ctx, kv_type, left, reserve_bytes, margin_bytes)
    return plan, Plan(draft_plan.gpu_layers, draft_plan.total_layers, draft_plan.needed_bytes, draft_plan.budget_bytes,
                      f"after the target: {draft_plan.reason}")


def nvidia_free_bytes() -> int | None:
    """Free memory of the first NVIDIA GPU (nvidia-smi; NVML underneath), or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.split()[0]) * 2**20
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def unified_free_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Unified-memory boards (Jetson): the GPU allocates from system RAM, so MemAvailable counts."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_unified_memory_board() -> bool:
    return Path("/etc/nv_tegra_release").exists() or Path("/sys/module/tegra_fuse").exists()


def accelerator_free_bytes() -> tuple[int | None, str]:
    if is_unified_memory_board():
        return unified_free_bytes(), "unified memory (MemAvailable)"
    free = nvidia_free_bytes()
    return free, "nvidia-smi" if free is not None else "none"
