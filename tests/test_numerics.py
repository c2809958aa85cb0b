"""llama.cpp running our converted files agrees with the numpy reference of Llama-2."""

import numpy as np
import pytest
import sentencepiece as spm

from helpers import as_stored, llama_logits, peft_merge, read_checkpoint
from reference_llama import forward

TEXT = "A 62-year-old woman is suddenly short of breath two days after hip surgery; which test confirms it?"
# F16 weights and llama.cpp's F16 dot products (activations rounded to F16) against a float64
# reference on the same F16-rounded weights; logits here have a spread of about 4.
LOGIT_ATOL = 0.05


@pytest.fixture(scope="module")
def tokens(tiny_base):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(TEXT)


@pytest.fixture(scope="module")
def reference(tiny_base, tiny_adapter, tokens):
    cfg, base = read_checkpoint(tiny_base)
    merged = as_stored(peft_merge(base, tiny_adapter))
    return {"merged": forward(merged, cfg, tokens), "base_only": forward(as_stored(base), cfg, tokens)}


def test_f16_logits_match_reference_at_every_position(f16_merged, tokens, reference):
    ours = llama_logits(f16_merged.output, tokens)
    ref = reference["merged"]
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    print(f"max |llama.cpp - reference| over {len(tokens)} positions: {err:.4g} (logit std {ref.std():.2f})")
    assert err < LOGIT_ATOL
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_adapter_visibly_changes_the_logits(f16_merged, tokens, reference):
    ours = llama_logits(f16_merged.output, tokens)
    moved = np.abs(reference["merged"] - reference["base_only"]).max()
    assert moved > 20 * LOGIT_ATOL, "the tiny adapter is too weak to prove anything"
    assert np.abs(ours - reference["base_only"]).max() > 10 * LOGIT_ATOL  # a converter that drops it fails


