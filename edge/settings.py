"""Runtime settings: defaults in ``data/default_config.toml``, a device file over them, CLI flags last."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from jee1.datafiles import read_toml
from jee1.errors import InputError

DRAFT_MODES = ("off", "model", "prompt-lookup")   # runtime.draft (edge/speculative.py)

DEFAULTS_FILE = resources.files("jee1.edge") / "data" / "default_config.toml"
DEVICE_CONFIG = Path("/etc/jee1/jee1.toml")
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}  # GGML type ids llama.cpp accepts for the KV cache


def _load_toml(path: Path | Any) -> dict:
    return read_toml(path, "config")


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise InputError(f"{where}: unknown setting {key!r} (known: {', '.join(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise InputError(f"{where}: [{key}] must be a table")
            out[key] = _merge(base[key], value, f"{where} [{key}]")
        else:
            if base[key] is not None and not _same_kind(key, base[key], value):
                raise InputError(f"{where}: {key} = {value!r} should be a {type(base[key]).__name__}")
            out[key] = value
    return out


# Settings that take more than their default's type (validate() checks their values).
MIXED_TYPES = {"gpu_layers": (str, int)}


def _same_kind(key: str, default, value) -> bool:
    if key in MIXED_TYPES:
        return isinstance(value, MIXED_TYPES[key]) and not isinstance(value, bool)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


@dataclass
class Settings:
    data: dict

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict | None = None) -> "Settings":
        data = _load_toml(DEFAULTS_FILE)
        if path is None and DEVICE_CONFIG.is_file():
            path = DEVICE_CONFIG
        if path is not None:
            data = _merge(data, _load_toml(Path(path)), str(path))
        if overrides:
            data = _merge(data, overrides, "command line")
        settings = cls(data)
        settings.validate()
        return settings

    def __getitem__(self, section: str) -> dict:
        return self.data[section]

    def validate(self) -> None:
        rt, ans = self.data["runtime"], self.data["answer"]
        if rt["kv_type"] not in KV_TYPES:
            raise InputError(f"runtime.kv_type {rt['kv_type']!r} is not one of {', '.join(KV_TYPES)}")
        gl = rt["gpu_layers"]
        if not (gl == "auto" or (isinstance(gl, int) and gl >= 0)
                or (isinstance(gl, str) and gl.isdigit())):
            raise InputError(f"runtime.gpu_layers {gl!r} must be 'auto' or a non-negative integer")
        if rt["draft"] not in DRAFT_MODES:
            raise InputError(f"runtime.draft {rt['draft']!r} is not one of {', '.join(DRAFT_MODES)}")
        if rt["draft"] == "model" and not rt["draft_model"]:
            raise InputError("runtime.draft = \"model\" needs runtime.draft_model (a GGUF path)")
        for section, key in (("runtime", "n_ctx"), ("runtime", "batch"), ("runtime", "draft_tokens"),
                             ("answer", "max_tokens"), ("answer", "queue_size")):
            if self.data[section][key] < 1:
                raise InputError(f"{section}.{key} must be at least 1")
        if ans["deadline_s"] <= 0:
            raise InputError("answer.deadline_s must be positive")
        for key in ("emergency_number", "crisis_line"):
            if not self.data["safety"][key].strip():
                raise InputError(f"safety.{key} must not be empty: the fixed safety messages tell the user to call it")
