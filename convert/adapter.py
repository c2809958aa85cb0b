"""A PEFT LoRA adapter directory, validated against the base, and the merge arithmetic PEFT defines.

PEFT merges a LoRA layer as  W' = W + scale * (B @ A)  with  scale = lora_alpha / r, or
lora_alpha / sqrt(r) when ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` override r and
alpha per module; ``modules_to_save`` modules are replaced whole by the adapter's copy.
QLoRA adapters are ordinary LoRA adapters on disk (the 4-bit base is only a training detail).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jee1.datafiles import read_json
from jee1.errors import InputError

from .checkpoint import Checkpoint
from .safetensors_io import SafetensorsFile
from .torch_pickle import TorchZipFile
from .tensor_map import layer_index, module_name, tensor_specs

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"    # PEFT before 0.6 and the original QLoRA scripts
# Keys as PEFT saves them: "base_model.model.<module>.lora_A.weight" (adapter name removed),
# older files may still carry it: "...lora_A.default.weight".
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight")
_SAVED_KEY = re.compile(r"base_model\.model\.(?P<module>.+?)(?:\.modules_to_save(?:\.[^.]+)?)?\.weight")
_UNSUPPORTED_CONFIG = {  # adapter_config.json field -> why we refuse when it is set
    "use_dora": "DoRA adapters are not supported (merge needs the magnitude vector); export a plain LoRA",
    "trainable_token_indices": "trainable-token adapters are not supported",
}


@dataclass(frozen=True)
class LoraPair:
    module: str        # "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float


def pattern_key(patterns, module: str) -> str | None:
    """The rank_pattern/alpha_pattern key PEFT applies to ``module`` (exact name first, then suffix regex)."""
    if module in patterns:
        return module
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def targets_module(targets, module: str) -> bool:
    """PEFT's target_modules rule: a string is a full-match regex, a list matches name suffixes."""
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


class Adapter:
    def __init__(self, root: Path, config: dict, weights: SafetensorsFile,
                 pairs: dict[str, LoraPair], saved: dict[str, str]):
        self.root = root
        self.config = config
        self.weights = weights
        self.pairs = pairs      # base weight name -> LoRA pair
        self.saved = saved      # base weight name -> adapter key of its full replacement
        self.files = [root / CONFIG_FILE, weights.path]

    @property
    def name(self) -> str:
        return self.root.resolve().name

    @classmethod
    def open(cls, root: str | Path, base: Checkpoint) -> "Adapter":
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root}: adapter directory does not exist")
        config_path = root / CONFIG_FILE
        config = read_json(config_path, "the PEFT adapter config")
        kind = config.get("peft_type")
        if kind != "LORA":
            raise InputError(f"{config_path}: peft_type {kind!r} is not supported; only LORA (and QLoRA) adapters are")
        for field, why in _UNSUPPORTED_CONFIG.items():
            if config.get(field):
                raise InputError(f"{config_path}: {field} is set: {why}")
        if config.get("fan_in_fan_out"):
            # PEFT resets this to False for torch.nn.Linear targets, which every Llama projection is.
            log.warning("%s: fan_in_fan_out=true is ignored for Llama's nn.Linear layers, as PEFT does", config_path)
        weights_path = root / WEIGHTS_FILE
        if weights_path.is_file():
            weights = SafetensorsFile(weights_path)
        elif (root / PICKLE_WEIGHTS_FILE).is_file():
            weights = TorchZipFile(root / PICKLE_WEIGHTS_FILE)
        else:
            raise InputError(f"{weights_path}: missing (adapter weights; {PICKLE_WEIGHTS_FILE} is read too)")
        adapter = cls(root, config, weights, {}, {})
        adapter._index(base)
        return adapter

    def _index(self, base: Checkpoint) -> None:
        cfg, path = self.config, self.weights.path
        try:
            rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{self.root / CONFIG_FILE}: needs integer 'r' and numeric 'lora_alpha'") from None
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        base_weights = {s.hf_name: s for s in tensor_specs(base.config)}
        found: dict[str, dict[str, str]] = {}
        for key in self.weights.entries:
            if "lora_embedding_" in key or "lora_magnitude_vector" in key:
                raise InputError(f"{path}: tensor {key!r}: LoRA on embeddings and DoRA are not supported")
            m = _LORA_KEY.fullmatch(key)
            if m:
                found.setdefault(m.group("module"), {})[m.group("ab")] = key
                continue
            m = _SAVED_KEY.fullmatch(key)
            target = f"{m.group('module')}.weight" if m else None
            if target not in base_weights:
                raise InputError(f"{path}: tensor {key!r} matches no weight of the base model")
            if self.weights.entries[key].shape != base_weights[target].shape:
                raise InputError(f"{path}: modules_to_save tensor {key!r} has shape "
                                 f"{list(self.weights.entries[key].shape)}, base {target!r} has "
                                 f"{list(base_weights[target].shape)}")
            self.saved[target] = key
        for module, ab in sorted(found.items()):
            weight = f"{module}.weight"
            if weight not in base_weights or base_weights[weight].is_norm:
                raise InputError(f"{path}: LoRA tensors for {module!r}, which is not a linear layer of the base")
            if set(ab) != {"A", "B"}:
                missing = ({"A", "B"} - set(ab)).pop()
                raise InputError(f"{path}: {module!r} has lora_{set(ab).pop()} but no lora_{missing}")
            r = int(rank_pattern.get(pattern_key(rank_pattern, module), rank))
            a_alpha = float(alpha_pattern.get(pattern_key(alpha_pattern, module), alpha))
            out_dim, in_dim = base_weights[weight].shape
            a_shape, b_shape = self.weights.entries[ab["A"]].shape, self.weights.entries[ab["B"]].shape
            if a_shape != (r, in_dim) or b_shape != (out_dim, r):
                raise InputError(f"{path}: {module!r} lora_A {list(a_shape)} / lora_B {list(b_shape)} do not match "
                                 f"the base weight {[out_dim, in_dim]} at rank {r}")
            scale = a_alpha / math.sqrt(r) if cfg.get("use_rslora") else a_alpha / r
            self.pairs[weight] = LoraPair(module, ab["A"], ab["B"], r, a_alpha, scale)
        self._check_targets(base_weights)

    def _check_targets(self, base_weights) -> None:
        """Every module target_modules selects must have LoRA weights, and no others may."""
        cfg, path = self.config, self.weights.path
        targets, excluded = cfg.get("target_modules"), cfg.get("exclude_modules")
        layers = cfg.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        for weight, spec in base_weights.items():
            module = module_name(weight)
            selected = (not spec.is_norm and targets_module(targets, module)
                        and not targets_module(excluded, module)
                        and (layers is None or layer_index(module) in layers))
            if selected and weight not in self.pairs:
                raise InputError(f"{path}: target_modules selects {module!r} but the file has no LoRA weights for it")
            if not selected and weight in self.pairs:
                raise InputError(f"{path}: LoRA weights for {module!r}, which target_modules "
                                 f"{targets!r} does not select")
        declared = cfg.get("modules_to_save") or []
        for weight, key in self.saved.items():
            if not targets_module(declared, module_name(weight)):
                raise InputError(f"{path}: full tensor {key!r} but {module_name(weight)!r} is not in modules_to_save")

    def factors(self, weight: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale * B, A) in float32 for a base weight, or None if the adapter leaves it alone.

        Small (rank x width); the merge multiplies them one block of output rows at a time.
        """
        pair = self.pairs.get(weight)
        if pair is None:
            return None
        factors = (self.weights.to_float32(pair.b_key) * np.float32(pair.scale), self.weights.to_float32(pair.a_key))
        # the mapped pages would otherwise stay in this process's RSS for the rest of the run:
        # the whole adapter by the end, a peak that grew with the model's depth
        self.weights.release(pair.a_key)
        self.weights.release(pair.b_key)
        return factors

    def close(self) -> None:
        self.weights.close()
