"""bitsandbytes' 4-bit blockwise round trip (NF4/FP4, double quantization), in numpy, bit for bit.

QLoRA trains its adapter against the base as bitsandbytes stores it: every decoder linear weight
W is cut into blocks of ``blocksize`` consecutive elements (flattened row-major), each block is
scaled by its absolute maximum into [-1, 1] and rounded to the nearest of 16 code values.  With
double quantization the block maxima are stored again, 8-bit: their mean ("offset") is
subtracted and the rest quantized in blocks of 256 with bitsandbytes' signed dynamic 8-bit code.
The model the adapter saw is the dequantization: code[q] * (code8[q2] * absmax2 + offset),
rounded to the compute dtype.

Every step below reproduces what bitsandbytes 0.50 does on the CPU (its reference implementation
and the C kernels of ``libbitsandbytes_cpu``): the same float32 operations in the same order, the
same tie rules.  ``tests/test_bnb4.py`` checks the result against bitsandbytes itself.  Facts
that are easy to get wrong, all measured against bitsandbytes:

* the 4-bit codes are chosen with the exact block maxima (not the double-quantized ones), by
  ``searchsorted(midpoints, x * (1 / absmax), side="left")``: a value exactly on a midpoint takes
  the lower code;  the last, partial block is scaled by ``x / absmax`` (a division, not a
  reciprocal), and its absmax is floored at 1e-38, which an all-zero full block's is not;
* the 8-bit quantizer of the block maxima does not search the code: it maps x/absmax2 onto a
  65,536-entry table, ``int((x + 1) * 0.5 * 65535 + 0.5)`` with the last two steps fused into one
  FMA, and takes the table's nearest code;
* the dynamic 8-bit code comes from ``torch.linspace``, whose float32 points are
  ``start + step * i`` (fused) below half way and ``end - step * (n - 1 - i)`` above;
* float32 to bfloat16 and float16 round to nearest, ties to even.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F32 = np.float32
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # the ones bitsandbytes accepts
ABSMAX_BLOCKSIZE = 256                                    # double quantization's block size
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# bitsandbytes.functional.get_4bit_type: NF4's quantiles of N(0, 1); FP4 (e2m1, bias 2) in
# bit-pattern order, divided by its largest value
CODES_4BIT = {
    "nf4": np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], F32),
    # (code 8 is +0.0 here, as in bitsandbytes' Python table and CPU kernels; CUDA dequantizes it to -0.0)
    "fp4": np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                     0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], F32) / F32(12.0),
}


@dataclass(frozen=True)
class QloraBase:
    """How the QLoRA run stored its base: the choices of ``BitsAndBytesConfig`` that matter."""
    quant_type: str = "nf4"        # bnb_4bit_quant_type
    dtype: str = "bf16"            # the dtype the base was loaded in (torch_dtype / --bf16)
    blocksize: int = 64
    double_quant: bool = True      # bnb_4bit_use_double_quant

    def __post_init__(self):
        if self.quant_type not in CODES_4BIT:
            raise ValueError(f"4-bit type {self.quant_type!r}: choose one of {', '.join(CODES_4BIT)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"block size {self.blocksize}: bitsandbytes accepts "
                             f"{', '.join(map(str, BLOCKSIZES))} (powers of two)")

    def as_json(self) -> dict:
        return {"quant_type": self.quant_type, "dtype": self.dtype, "blocksize": self.blocksize,
                "double_quant": self.double_quant}


# ---- the code tables --------------------------------------------------------------------------

def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    s, e = F32(start), F32(end)
    step = np.float64(F32((e - s) / F32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    low = (np.float64(s) + step * i).astype(F32)              # float64 holds the exact product: one rounding, as FMA
    high = (np.float64(e) - step * (steps - 1 - i)).astype(F32)
    return np.where(np.arange(steps) < steps // 2, low, high)


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes.functional.create_dynamic_map(signed=True): 256 sorted float32 values in [-1, 1]."""
    values: list[np.ndarray] = []
    for i in range(max_exponent_bits):
        bounds = _torch_linspace(0.1, 1.0, 2 ** (i + total_bits - 1 - max_exponent_bits) + 1)
        means = (bounds[:-1] + bounds[1:]) / F32(2)
        scaled = F32(10.0 ** (-(max_exponent_bits - 1) + i)) * means
        values += [scaled, -scaled]
    values.append(np.array([0.0, 1.0], F32))
    code = np.sort(np.concatenate(values).astype(F32))
    assert code.size == 2 ** total_bits
    return code


def _midpoints(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(code, kind="stable")
    return (code[order[:-1]] + code[order[1:]]) / F32(2), order


DYNAMIC_CODE = dynamic_code()
_LUT_SIZE = 65536


def _lut_for(code: np.ndarray) -> np.ndarray:
    """libbitsandbytes_cpu's quantize table: for each of 65,536 points of [-1, 1], the nearest code."""
    mid = F32(0.5) * (code[:-1] + code[1:])
    points = F32(-1.0) + (F32(2.0) * np.arange(_LUT_SIZE, dtype=F32)) / F32(_LUT_SIZE - 1)
    return np.searchsorted(mid, points, side="left").astype(np.uint8)


_DYNAMIC_LUT = _lut_for(DYNAMIC_CODE)


# ---- 4-bit ------------------------------------------------------------------------------------

def block_absmax(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """Absolute maximum of each block of a float32 vector; a partial last block's floored at 1e-38."""
    full = flat.size // blocksize * blocksize
    absmax = np.abs(flat[:full]).reshape(-1, blocksize).max(axis=1) if full else np.empty(0, F32)
    if full < flat.size:
        absmax = np.append(absmax, max(np.abs(flat[full:]).max(), F32(1e-38))).astype(F32)
    return absmax


def codes_4bit(scaled: np.ndarray, quant_type: str) -> np.ndarray:
    """Index of the nearest code for values in [-1, 1]; on a midpoint, the lower one.

    Counting the midpoints below each value equals searchsorted(side="left") and is 5x faster."""
    mid, order = _midpoints(CODES_4BIT[quant_type])
    q = np.zeros(scaled.shape, np.uint8)
    above = np.empty(scaled.shape, bool)
    for m in mid:
        q += np.greater(scaled, m, out=above)
    return order.astype(np.uint8)[q] if quant_type != "nf4" else q


# ---- double quantization of the block maxima ---------------------------------------------------

def quantize_8bit(values: np.ndarray, blocksize: int = ABSMAX_BLOCKSIZE) -> tuple[np.ndarray, np.ndarray]:
    """libbitsandbytes_cpu's blockwise dynamic 8-bit quantization of a float32 vector (all blocks at
    once: a 70B layer's weight has some 14,000 of them)."""
    values = np.ascontiguousarray(values, F32).reshape(-1)
    rows = np.zeros(-(-values.size // blocksize) * blocksize, F32)
    rows[:values.size] = values                      # zero padding changes no block's absmax
    rows = rows.reshape(-1, blocksize)
    absmax = np.abs(rows).max(axis=1)
    live = absmax > 0                                # an all-zero block keeps code 0
    with np.errstate(divide="ignore"):
        reciprocal = np.where(live, F32(1.0) / absmax, F32(0.0)).astype(F32)
    scaled = np.clip(rows * reciprocal[:, None], F32(-1.0), F32(1.0))
    half = ((scaled + F32(1.0)) * F32(0.5)).astype(np.float64)
    index = (half * (_LUT_SIZE - 1) + 0.5).astype(F32).astype(np.uint16)   # one rounding: the FMA
    q = np.where(live[:, None], _DYNAMIC_LUT[index], np.uint8(0)).astype(np.uint8)
    return q.reshape(-1)[:values.size], absmax


def dequantize_8bit(q: np.ndarray, absmax: np.ndarray, blocksize: int = ABSMAX_BLOCKSIZE) -> np.ndarray:
    return DYNAMIC_CODE[q] * np.repeat(absmax, blocksize)[:q.size]


def mean_f32(values: np.ndarray) -> np.float32:
    """The float32 mean, correctly rounded.  bitsandbytes takes ``torch.mean`` in float32, whose
    result depends on the hardware (vector width, thread count, CPU or CUDA) and is within 2 ulp
    of this one (measured); no single bit pattern is "the" offset the training run used."""
    return F32(values.astype(np.float64).mean())


def dequantization_scales(absmax: np.ndarray, double_quant: bool, offset: np.float32 | None = None) -> np.ndarray:
    """The per-block scale dequantization multiplies by: absmax itself, or its 8-bit round trip."""
    if not double_quant:
        return absmax
    offset = mean_f32(absmax) if offset is None else F32(offset)
    q, absmax2 = quantize_8bit(absmax - offset)
    return dequantize_8bit(q, absmax2) + offset


# ---- rounding to the compute dtype -------------------------------------------------------------

def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> ``dtype`` -> float32 in place, rounding to nearest even (bfloat16 by its bits)."""
    if dtype == "fp16":
        with np.errstate(over="ignore"):
            values[...] = values.astype(np.float16)
    elif dtype == "bf16":
        bits = values.view(np.uint32)
        bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        bits &= np.uint32(0xFFFF0000)
    return values


# ---- one weight matrix, streamed ---------------------------------------------------------------

class TensorRoundTrip:
    """The round trip of one [rows, cols] weight, computed a block of rows at a time.

    Pass 1 (``observe``) sees the rows in order, in chunks of ``chunk_rows(...)`` that start on a
    quantization block, and collects every block's absmax: double quantization needs their mean
    over the whole tensor before any value can be dequantized.  Pass 2 (``apply``) takes any set of
    rows (the writer reads Q and K in llama.cpp's rotary order) and replaces them in place.
    Memory: one float32 per block (1/64 of the weight in float32), whatever the tensor size.
    """

    def __init__(self, base: QloraBase, shape: tuple[int, int]):
        self.base, self.rows, self.cols = base, shape[0], shape[1]
        self.size = self.rows * self.cols
        self.full_blocks = self.size // base.blocksize
        self._absmax: list[np.ndarray] = []
        self.absmax = self.scales = self.reciprocal = None   # set by finish()

    def chunk_rows(self, wanted: int) -> int:
        unit = self.base.blocksize // math.gcd(self.cols, self.base.blocksize)
        return max(unit, wanted // unit * unit)

    def observe(self, chunk: np.ndarray) -> tuple[np.float32, np.float32]:
        """A chunk of rows in order (float32 scratch, rounded in place; ``chunk_rows`` long but the
        last).  Returns
        its (min, max) as loaded, which are not finite where the input has NaN or Inf or exceeds
        the dtype (float16 overflows at 65520)."""
        loaded = round_to(chunk.reshape(-1), self.base.dtype)
        self._absmax.append(block_absmax(loaded, self.base.blocksize))
        return loaded.min(), loaded.max()

    def finish(self, offset: np.float32 | None = None) -> None:
        """After the last chunk.  ``offset`` overrides the double-quantization offset (tests use
        bitsandbytes' own to check everything downstream of it bit for bit)."""
        absmax = np.concatenate(self._absmax) if self._absmax else np.empty(0, F32)
        if absmax.size != -(-self.size // self.base.blocksize):
            raise AssertionError(f"observed {absmax.size} blocks of a {self.rows}x{self.cols} weight")
        self._absmax = []
        self.reciprocal = F32(1.0) / np.maximum(absmax, F32(1e-38))
        self.absmax = absmax
        self.scales = dequantization_scales(absmax, self.base.double_quant, offset)

    def apply(self, block: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Replace ``block`` (float32, the weight's ``rows``, in that order) by its round trip."""
        base, code = self.base, CODES_4BIT[self.base.quant_type]
        loaded = round_to(block, base.dtype)
        if self.cols % base.blocksize == 0:        # every row is whole blocks: no partial block
            per_row = self.cols // base.blocksize
            blocks = rows[:, None] * per_row + np.arange(per_row)
            values = loaded.reshape(len(rows), per_row, base.blocksize)
            scaled = values * self.reciprocal[blocks][..., None]
            np.clip(scaled, F32(-1.0), F32(1.0), out=scaled)
            values[...] = np.take(code, codes_4bit(scaled, base.quant_type)) * self.scales[blocks][..., None]
        else:
            blocks = (rows[:, None] * self.cols + np.arange(self.cols)) // base.blocksize
            partial = blocks >= self.full_blocks
            with np.errstate(divide="ignore", invalid="ignore"):
                scaled = np.where(partial, loaded / self.absmax[blocks], loaded * self.reciprocal[blocks])
            np.clip(scaled, F32(-1.0), F32(1.0), out=scaled)
            loaded[...] = np.take(code, codes_4bit(scaled, base.quant_type)) * self.scales[blocks]
        return round_to(block, base.dtype)


def round_trip(weights: np.ndarray, base: QloraBase) -> np.ndarray:
    """The weight as the QLoRA model computes with it, in float32: loaded in ``base.dtype``,
    quantized to 4 bits, dequantized.  The whole array at once, by the converter's streaming code."""
    shape = weights.shape
    matrix = np.array(weights, F32).reshape(shape[0] if len(shape) > 1 else 1, -1)
    trip = TensorRoundTrip(base, matrix.shape)
    trip.observe(matrix)
    trip.finish()
    return trip.apply(matrix, np.arange(matrix.shape[0])).reshape(shape)
