"""SentencePiece ``tokenizer.model`` -> the GGUF vocabulary llama.cpp's SPM tokenizer reads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from gguf import TokenType

from jee1.datafiles import read_json
from jee1.errors import InputError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
ADDED_TOKENS = "added_tokens.json"
ADDED_TOKEN_SCORE = -1000.0


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
    _add_added_tokens(base_dir, tok_config, tokens, scores, types)
    return Vocab(
        tokens=tokens, scores=scores, types=types,
        bos_id=sp.bos_id(), eos_id=sp.eos_id(), unk_id=sp.unk_id(),
        pad_id=sp.pad_id() if sp.pad_id() >= 0 else None,
        add_bos=bool(tok_config.get("add_bos_token", True)),
        add_eos=bool(tok_config.get("add_eos_token", False)),
        # The model's normalizer adds a leading "▁" (add_dummy_prefix) iff a lone word starts with it.
        add_space_prefix=sp.encode_as_pieces("x")[0].startswith("\u2581"),
    )


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _add_added_tokens(base_dir: Path, tok_config: dict, tokens: list[bytes], scores: list[float],
                      types: list[int]) -> None:
    """Tokens a fine-tune added after the SentencePiece model, as llama.cpp's converter takes them:
    ``added_tokens.json`` (name -> id, user-defined), then ``tokenizer_config.json``'s
    ``added_tokens_decoder`` (id -> content; control when marked special).  Without this their ids
    would be padding, and the model could neither read nor write them."""
    added_path = base_dir / ADDED_TOKENS
    added = read_json(added_path, "added tokens") if added_path.is_file() else {}
    if not isinstance(added, dict):
        raise InputError(f"{added_path}: must be a JSON object of token -> id")
    decoder = tok_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise InputError(f"{base_dir / TOKENIZER_CONFIG}: added_tokens_decoder must be an object of id -> token")
    entries = [(name, token_id, None) for name, token_id in added.items()]
    for key, data in decoder.items():
        try:
            entries.append((data["content"], int(key), bool(data.get("special"))))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{base_dir / TOKENIZER_CONFIG}: added_tokens_decoder entry {key!r} needs an integer "
                             "id and a 'content'") from None
    for name, token_id, special in entries:
        if not isinstance(token_id, int) or not isinstance(name, str):
            raise InputError(f"{added_path}: token {name!r} has id {token_id!r}, not an integer")
        if not 0 <= token_id < len(tokens):
            log.warning("added token %r: id %d is outside the vocabulary of %d; ignored", name, token_id, len(tokens))
            continue
        content = name.encode("utf-8")
        if types[token_id] != TokenType.UNUSED and tokens[token_id] != content:
            log.warning("added token %d replaces %r with %r", token_id, tokens[token_id].decode("utf-8", "replace"), name)
        if special or (special is not None and _looks_special(name)):
            types[token_id] = TokenType.CONTROL
        else:
            content = name.replace("\u2581", " ").encode("utf-8") if special is not None else content
            types[token_id] = TokenType.USER_DEFINED
        tokens[token_id] = content
        scores[token_id] = ADDED_TOKEN_SCORE
