"""A Hugging Face Llama checkpoint directory: config, tensor index across shards, validation.

Nothing here reads tensor data; ``Checkpoint.open`` checks that every tensor the GGUF needs
exists with the right shape, so bad input fails before any output is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from jee1.datafiles import read_json
from jee1.errors import InputError

from .safetensors_io import SafetensorsFile, TensorEntry
from .tensor_map import IGNORED, tensor_specs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM"}
# rope_scaling types llama.cpp's llama architecture can express -> its GGUF name
ROPE_SCALING_TYPES = {"linear": "linear", "yarn": "yarn"}


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    name: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def load(cls, path: Path) -> "LlamaConfig":
        return cls.from_hf(read_json(path, "the model's config.json"), path)

    @classmethod
    def from_hf(cls, raw: dict, path: Path) -> "LlamaConfig":
        """A Hugging Face config.json's fields, checked; ``path`` names the file in errors."""
        archs = raw.get("architectures") or []
        if raw.get("model_type") != "llama" or not SUPPORTED_ARCHITECTURES & set(archs):
            found = ", ".join(archs) or raw.get("model_type") or "unknown"
            raise InputError(f"{path}: base model is {found}; jee1-convert supports Llama "
                             f"(model_type 'llama', LlamaForCausalLM) only")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise InputError(f"{path}: {flag}=true is not a Llama-2 layout and is not supported")
        try:
            heads = int(raw["num_attention_heads"])
            config = cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(raw.get("rope_theta", 10000.0)),
                rope_scaling=raw.get("rope_scaling"),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                name=str(raw.get("_name_or_path") or path.parent.name),
            )
        except KeyError as e:
            raise InputError(f"{path}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise InputError(f"{path}: malformed field ({e})") from None
        config._validate(path)
        return config

    def _validate(self, path: Path) -> None:
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise InputError(f"{path}: hidden_size {self.hidden_size} is not an even multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(f"{path}: num_attention_heads {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_SCALING_TYPES or not math.isfinite(float(self.rope_scaling.get("factor", "nan"))):
                raise InputError(f"{path}: rope_scaling {self.rope_scaling} is not supported "
                                 f"(supported: {', '.join(ROPE_SCALING_TYPES)} with a factor)")


class Checkpoint:
    """Validated view of BASE_DIR: config plus name -> (shard, entry) for every tensor."""

    def __init__(self, root: Path, config: LlamaConfig, tensors: dict[str, tuple[SafetensorsFile, TensorEntry]],
                 files: list[Path]):
        self.root = root
        self.config = config
        self.tensors = tensors
        self.files = files  # every input file, for the manifest

    @classmethod
    def open(cls, root: str | Path) -> "Checkpoint":
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root}: base checkpoint directory does not exist")
        config = LlamaConfig.load(root / "config.json")
        shards, weight_map = cls._shards(root)
        tensors: dict[str, tuple[SafetensorsFile, TensorEntry]] = {}
        for shard in shards.values():
            for name, entry in shard.entries.items():
                tensors[name] = (shard, entry)
        for name, shard_name in weight_map.items():
            if name not in tensors or tensors[name][0].path.name != shard_name:
                raise InputError(f"{root / INDEX_FILE}: names tensor {name!r} in {shard_name}, "
                                 f"but {shard_name} does not contain it")
        checkpoint = cls(root, config, tensors, [root / "config.json"] + [s.path for s in shards.values()])
        checkpoint._check_tensors()
        for optional in (INDEX_FILE, "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
            if (root / optional).is_file():
                checkpoint.files.append(root / optional)
        return checkpoint

    @staticmethod
    def _shards(root: Path) -> tuple[dict[str, SafetensorsFile], dict[str, str]]:
        index_path = root / INDEX_FILE
        if index_path.exists():
            weight_map = read_json(index_path, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{index_path}: has no weight_map")
            names = sorted(set(weight_map.values()))
            for name in names:
                if not (root / name).is_file():
                    raise InputError(f"{root / name}: shard listed in {INDEX_FILE} is missing")
        elif (root / SINGLE_FILE).is_file():
            weight_map, names = {}, [SINGLE_FILE]
        else:
            raise InputError(f"{root}: no {INDEX_FILE} and no {SINGLE_FILE}")
        return {name: SafetensorsFile(root / name) for name in names}, weight_map

    def _check_tensors(self) -> None:
        specs = tensor_specs(self.config)
        expected = {s.hf_name for s in specs}
        for spec in specs:
            if spec.hf_name not in self.tensors:
                raise InputError(f"{self.root}: tensor {spec.hf_name!r} is missing from the checkpoint")
            shard, entry = self.tensors[spec.hf_name]
            if entry.shape != spec.shape:
                raise InputError(f"{shard.path}: tensor {spec.hf_name!r} has shape {list(entry.shape)}, "
                                 f"config.json implies {list(spec.shape)}")
        for name, (shard, _) in self.tensors.items():
            if name not in expected and not IGNORED.fullmatch(name):
                if name == "lm_head.weight" and self.config.tie_word_embeddings:
                    continue
                raise InputError(f"{shard.path}: unexpected tensor {name!r} for a Llama checkpoint")

    def close(self) -> None:
        for shard in {id(s): s for s, _ in self.tensors.values()}.values():
            shard.close()
