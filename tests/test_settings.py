"""Settings: documented defaults, a device file over them, CLI overrides last, clear errors."""

from pathlib import Path

import pytest

from jee1.edge.settings import Settings
from jee1.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_load_and_are_documented():
    s = Settings.load()
    assert s["runtime"]["gpu_layers"] == "auto" and s["answer"]["max_tokens"] == 512
    text = (REPO / "edge" / "data" / "default_config.toml").read_text()
    for section in s.data.values():
        for key in section:
            assert f"{key} =" in text


def test_device_example_config_is_valid():
    s = Settings.load(REPO / "deploy" / "jee1.toml")
    assert s["runtime"]["n_ctx"] == 4096 and s["model"]["trusted_keys"]


def test_file_then_overrides(tmp_path):
    cfg = tmp_path / "jee1.toml"
    cfg.write_text("[runtime]\nn_ctx = 4096\nthreads = 4\n")
    s = Settings.load(cfg, {"runtime": {"threads": 2}})
    assert s["runtime"]["n_ctx"] == 4096 and s["runtime"]["threads"] == 2 and s["runtime"]["batch"] == 512


@pytest.mark.parametrize("body,message", [
    ("[runtime]\nn_ctx = 'big'\n", "n_ctx = 'big' should be a int"),
    ("[runtime]\nkv_type = 'q5'\n", "kv_type 'q5'"),
    ("[runtime]\ngpu_layers = -3\n", "gpu_layers"),
    ("[answer]\nmax_tokens = 0\n", "answer.max_tokens must be at least 1"),
    ("[nonsense]\nx = 1\n", "unknown setting 'nonsense'"),
    ("[runtime\n", "not valid TOML"),
])
def test_invalid_settings_are_named(tmp_path, body, message):
    cfg = tmp_path / "jee1.toml"
    cfg.write_text(body)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("'", "'")):
        Settings.load(cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="config file does not exist"):
        Settings.load(tmp_path / "none.toml")


def test_only_gpu_layers_takes_a_string_or_a_number(tmp_path):
    cfg = tmp_path / "jee1.toml"
    cfg.write_text("[answer]\npreamble = 5\n")
    with pytest.raises(InputError, match="preamble = 5 should be a str"):
        Settings.load(cfg)
    cfg.write_text("[runtime]\ngpu_layers = 40\n")
    assert Settings.load(cfg)["runtime"]["gpu_layers"] == 40
