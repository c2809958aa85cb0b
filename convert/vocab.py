"""SentencePiece ``tokenizer.model`` -> the GGUF vocabulary llama.cpp's SPM tokenizer reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from gguf import TokenType

from jee1.datafiles import read_json
from jee1.errors import InputError

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool


def _token_type(sp: spm.SentencePieceProcessor, i: int) -> int:
    if sp.is_unknown(i):
        return TokenType.UNKNOWN
    if sp.is_control(i):
        return TokenType.CONTROL
    if sp.is_unused(i):
        return TokenType.UNUSED
    if sp.is_byte(i):
        return TokenType.BYTE
    return TokenType.NORMAL


def load_vocab(base_dir: Path, vocab_size: int) -> Vocab:
    path = base_dir / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing (SentencePiece tokenizer)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise InputError(f"{path}: unreadable SentencePiece model ({str(e).splitlines()[0]})") from None
    n = sp.vocab_size()
    if n > vocab_size:
        raise InputError(f"{path}: has {n} tokens but config.json vocab_size is {vocab_size}")
    tokens = [sp.id_to_piece(i).encode("utf-8") for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = [_token_type(sp, i) for i in range(n)]
    for i in range(n, vocab_size):  # embedding rows past the tokenizer (padded vocab), as llama.cpp does
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    config_path = base_dir / TOKENIZER_CONFIG
    tok_config = read_json(config_path, "tokenizer settings") if config_path.is_file() else {}
    return Vocab(
        tokens=tokens, scores=scores, types=types,
        bos_id=sp.bos_id(), eos_id=sp.eos_id(), unk_id=sp.unk_id(),
        pad_id=sp.pad_id() if sp.pad_id() >= 0 else None,
        add_bos=bool(tok_config.get("add_bos_token", True)),
        add_eos=bool(tok_config.get("add_eos_token", False)),
        # The model's normalizer adds a leading "▁" (add_dummy_prefix) iff a lone word starts with it.
        add_space_prefix=sp.encode_as_pieces("x")[0].startswith("\u2581"),
    )
