"""Output types ``jee1-convert --quant`` accepts, as one table.

F16 and BF16 are written directly by our streaming writer; the others are written as an F16
intermediate and handed to llama.cpp's own quantizer (``llama_model_quantize``).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as GGML
from gguf import LlamaFileType as FT


@dataclass(frozen=True)
class QuantType:
    name: str
    file_type: FT                # general.file_type of the final file
    written: GGML                # type of 2-D tensors in the file our writer produces
    primary: GGML                # the type most 2-D tensors end up in (checked after conversion)
    bits_per_weight: float       # for the disk-space estimate (llama.cpp's published sizes, rounded up)

    @property
    def needs_llama_quantizer(self) -> bool:
        """Our writer produces ``written``; anything else is llama.cpp's quantizer's job."""
        return self.primary != self.written


QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("F16", FT.MOSTLY_F16, GGML.F16, GGML.F16, 16.0),
    QuantType("BF16", FT.MOSTLY_BF16, GGML.BF16, GGML.BF16, 16.0),
    QuantType("Q8_0", FT.MOSTLY_Q8_0, GGML.F16, GGML.Q8_0, 8.5),
    QuantType("Q6_K", FT.MOSTLY_Q6_K, GGML.F16, GGML.Q6_K, 6.6),
    QuantType("Q5_K_M", FT.MOSTLY_Q5_K_M, GGML.F16, GGML.Q5_K, 5.8),
    QuantType("Q4_K_M", FT.MOSTLY_Q4_K_M, GGML.F16, GGML.Q4_K, 5.0),
)}
DEFAULT_QUANT = "Q4_K_M"


def quant_type(name: str) -> QuantType:
    from jee1.errors import InputError

    try:
        return QUANT_TYPES[name.upper()]
    except KeyError:
        raise InputError(f"unknown quant type {name!r} (choose from {', '.join(QUANT_TYPES)})") from None
