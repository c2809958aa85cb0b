"""Chat templates (Jinja, the form llama.cpp, llama-cpp-python and Ollama apply), kept as data files.

``jee1-convert --template`` stores one in the GGUF as ``tokenizer.chat_template``; the runtime
reads it back from there.  Templates render with ``messages``, ``bos_token``, ``eos_token``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import jinja2
import jinja2.sandbox

from jee1.errors import InputError

DEFAULT_TEMPLATE = "medalpaca"
_PACKAGE = resources.files("jee1") / "prompts"


def template_names() -> list[str]:
    return sorted(p.name.removesuffix(".jinja") for p in _PACKAGE.iterdir() if p.name.endswith(".jinja"))


def load_template(name_or_file: str = DEFAULT_TEMPLATE) -> tuple[str, str]:
    """(name, Jinja source) of a built-in template name or a template file; checked to compile."""
    builtin = _PACKAGE / f"{name_or_file}.jinja"
    if builtin.is_file():
        name, source = name_or_file, builtin.read_text(encoding="utf-8")
    else:
        path = Path(name_or_file)
        if not path.is_file():
            raise InputError(f"template {name_or_file!r}: neither a built-in template "
                             f"({', '.join(template_names())}) nor a file")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read template ({e})") from None
        name = path.stem
    compile_template(source, origin=name_or_file)
    return name, source


def compile_template(source: str, origin: str = "template") -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{origin}: not a valid Jinja template (line {e.lineno}: {e.message})") from None


def render(source: str, messages: list[dict], bos_token: str = "<s>", eos_token: str = "</s>") -> str:
    return compile_template(source).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                           add_generation_prompt=True)
