"""llama.cpp's tokenizer, reading our GGUF vocabulary, equals SentencePiece on varied text."""

import pytest
import sentencepiece as spm

from jee1.llama_backend import load_llama

TEXTS = [
    "Metformin 500 mg twice daily.",
    "Dose: 2.5mg/kg q8h × 3 days — then reassess; HbA1c 6.5%?",
    "Temperatur 38,5 °C, Übelkeit und Erbrechen; naïve café patient.",
    "糖尿病の治療 / 糖尿病治疗 / داء السكري / диабет",
    "Emoji: 💊🩺❤️‍🔥 and 🧬!",
    "   leading spaces, and    runs   of    spaces   ",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttabs\tand\r\nwindows newlines",
    "1234567890 3.14159 -42 1e-9 0x1F",
    "ǅ ﬁ ＡＢＣ ½ ² (compatibility characters, not normalised)",
    "",
    " ",
    "a",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_base, f16_merged):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    llama = load_llama(f16_merged.output, vocab_only=True)
    yield sp, llama
    llama.close()


@pytest.mark.parametrize("text", TEXTS)
def test_llama_cpp_tokenizes_like_sentencepiece(tokenizers, text):
    sp, llama = tokenizers
    ours = llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    assert ours == sp.encode(text)
    # llama-cpp-python's detokenize keeps the "▁" dummy prefix of the first word as a space
    assert llama.detokenize(ours).decode("utf-8").removeprefix(" ") == sp.decode(ours)


def test_byte_fallback_is_exercised(tokenizers):
    sp, _ = tokenizers
    ids = [i for i in sp.encode("💊") if sp.id_to_piece(i) != "\u2581"]
    assert [sp.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x92>", "<0x8A>"]


def test_bos_and_special_ids(tokenizers):
    sp, llama = tokenizers
    assert llama.token_bos() == sp.bos_id() and llama.token_eos() == sp.eos_id()
    assert llama.tokenize(b"Hello", add_bos=True)[0] == sp.bos_id()
