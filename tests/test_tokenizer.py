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


def test_added_tokens_are_taken_as_llama_cpp_takes_them(tmp_path, tiny_tokenizer, caplog):
    """added_tokens.json and tokenizer_config.json's added_tokens_decoder name the ids past the
    SentencePiece model: they become those tokens (control when special), not padding."""
    import json

    from gguf import GGUFReader, TokenType

    from conftest import run_convert
    from jee1.convert.tiny import TinySpec, build_checkpoint
    from jee1.llama_backend import load_llama

    base = build_checkpoint(tmp_path / "base", TinySpec(vocab_size=515), tokenizer=tiny_tokenizer)
    (base / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 512, "[MED]": 513, "<far>": 900}))
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"512": {"content": "<|im_start|>", "special": True},
                                      "513": {"content": "[MED]", "special": False}}
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        out = run_convert(base, tmp_path / "added.F16.gguf", "F16").output
    assert "'<far>': id 900 is outside the vocabulary" in caplog.text
    fields = GGUFReader(out).fields
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields["tokenizer.ggml.token_type"]
    token = lambda i: bytes(tokens.parts[tokens.data[i]]).decode()  # noqa: E731
    kind = lambda i: int(types.parts[types.data[i]][0])  # noqa: E731
    assert (token(512), kind(512)) == ("<|im_start|>", TokenType.CONTROL)
    assert (token(513), kind(513)) == ("[MED]", TokenType.USER_DEFINED)
    assert (token(514), kind(514)) == ("[PAD514]", TokenType.UNUSED)
    llama = load_llama(out, n_ctx=64, n_threads=1, vocab_only=True)
    try:
        assert 513 in llama.tokenize(b"ask [MED] now", add_bos=False, special=False)
        assert llama.tokenize(b"<|im_start|>", add_bos=False, special=True) == [512]
    finally:
        llama.close()
