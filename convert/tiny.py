"""A deterministic tiny SM70 stand-in: a Llama-2-architecture checkpoint in exact Hugging Face
layout (sharded fp16 safetensors + index, config, SentencePiece tokenizer trained on the spot on
the medical text we ship), and a PEFT-format LoRA adapter with non-zero B.

Used by every CPU test, ``jee1 demo`` and the benchmarks (which scale it up).  Seconds on a CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from jee1.datafiles import MEDICAL_TEXT as CORPUS   # the tokenizer's training text

from .checkpoint import INDEX_FILE, LlamaConfig
from .safetensors_io import write_safetensors
from .tensor_map import layer_index, module_name, tensor_specs

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 256          # a multiple of 256, so K-quants apply to every matrix
    intermediate_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2    # grouped-query attention, as in Llama-2-70B
    vocab_size: int = 512
    max_position_embeddings: int = 512
    shards: int = 3
    seed: int = 0
    output_gain: float = 4.0        # lm_head scale: spreads the logits, so the argmax is stable
    stuck_token: int | None = None  # a broken model that outputs this token forever (tests of loop replacement)

    def config(self) -> dict:
        return {
            "_name_or_path": "jee1-tiny-llama",
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "float16",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


@dataclass(frozen=True)
class AdapterSpec:
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] | str = field(default_factory=lambda: list(ALL_PROJECTIONS))
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    fan_in_fan_out: bool = False
    b_std: float = 0.15             # relative size of the update (B is zero in a fresh LoRA)
    seed: int = 1


def train_tokenizer(out_dir: Path, vocab_size: int) -> Path:
    """Train a Llama-style SentencePiece BPE model (byte fallback, digits split, no normalisation)."""
    import sentencepiece as spm

    with resources.as_file(CORPUS) as corpus:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, minloglevel=2,
        )
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    return out_dir / "tokenizer.model"


def _specs(spec: TinySpec):
    """The tensors of this shape, from the same table the converter checks checkpoints against."""
    return tensor_specs(LlamaConfig.from_hf(spec.config(), Path("tiny/config.json")))


def _weights(spec: TinySpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    weights = {}
    for s in _specs(spec):
        if s.is_norm:
            w = 1.0 + 0.1 * rng.standard_normal(s.shape, dtype=np.float32)
        elif s.hf_name == "model.embed_tokens.weight":
            w = rng.standard_normal(s.shape, dtype=np.float32)
        else:
            gain = spec.output_gain if s.hf_name == "lm_head.weight" else 1.0
            w = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(gain / math.sqrt(s.shape[1]))
        weights[s.hf_name] = w.astype(np.float16)
    if spec.stuck_token is not None:
        # the layers add nothing, every embedding shares one large component, and only the stuck
        # token's output row reads it: whatever the input, that token wins
        for name in weights:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weights[name][:] = 0
        weights["model.embed_tokens.weight"][:, 0] = 8
        weights["lm_head.weight"][:] = 0
        weights["lm_head.weight"][spec.stuck_token, 0] = spec.output_gain
    return weights


def build_checkpoint(out_dir: str | Path, spec: TinySpec = TinySpec(), tokenizer: Path | None = None) -> Path:
    """Write the checkpoint directory; ``tokenizer`` reuses an existing tokenizer.model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        train_tokenizer(out_dir, spec.vocab_size)
    elif tokenizer != out_dir / "tokenizer.model":
        (out_dir / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    _write_json(out_dir / "config.json", spec.config())
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": spec.max_position_embeddings})
    _write_json(out_dir / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    weights = _weights(spec)
    names = list(weights)
    per_shard = math.ceil(len(names) / spec.shards)
    weight_map, total = {}, 0
    for k in range(spec.shards):
        shard_name = f"model-{k + 1:05d}-of-{spec.shards:05d}.safetensors"
        shard = {n: weights[n] for n in names[k * per_shard:(k + 1) * per_shard]}
        write_safetensors(out_dir / shard_name, shard, {"format": "pt"})
        weight_map.update({n: shard_name for n in shard})
        total += sum(a.nbytes for a in shard.values())
    _write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return out_dir


def _adapted_modules(spec: TinySpec, adapter: AdapterSpec) -> list[tuple[str, tuple[int, int]]]:
    """(module, (out, in)) of every block projection the adapter's target_modules selects."""
    from .adapter import targets_module

    return [(module_name(s.hf_name), s.shape) for s in _specs(spec)
            if layer_index(s.hf_name) is not None and not s.is_norm
            and targets_module(adapter.targets, module_name(s.hf_name))]


def build_adapter(out_dir: str | Path, spec: TinySpec = TinySpec(), adapter: AdapterSpec = AdapterSpec()) -> Path:
    """Write a PEFT LoRA adapter for ``spec`` as PEFT saves one (keys without the adapter name)."""
    from .adapter import pattern_key

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(adapter.seed)
    tensors = {}
    for module, (out_dim, in_dim) in _adapted_modules(spec, adapter):
        r = int(adapter.rank_pattern.get(pattern_key(adapter.rank_pattern, module), adapter.rank))
        a = rng.standard_normal((r, in_dim), dtype=np.float32) / np.float32(math.sqrt(in_dim))
        b = rng.standard_normal((out_dim, r), dtype=np.float32) * np.float32(adapter.b_std / math.sqrt(r))
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    base = _weights(spec)
    for name in adapter.modules_to_save:
        weight = {"lm_head": "lm_head.weight", "embed_tokens": "model.embed_tokens.weight"}[name]
        tensors[f"base_model.model.{weight}"] = (base[weight].astype(np.float32)
                                                 + rng.standard_normal(base[weight].shape, dtype=np.float32)
                                                 * np.float32(0.05)).astype(np.float16)
    write_safetensors(out_dir / "adapter_model.safetensors", tensors, {"format": "pt"})
    _write_json(out_dir / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "jee1-tiny-llama",
        "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": 0.05, "bias": "none",
        "target_modules": adapter.targets, "use_rslora": adapter.use_rslora, "use_dora": False,
        "fan_in_fan_out": adapter.fan_in_fan_out, "rank_pattern": adapter.rank_pattern,
        "alpha_pattern": adapter.alpha_pattern, "modules_to_save": adapter.modules_to_save or None,
        "inference_mode": True})
    return out_dir


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
