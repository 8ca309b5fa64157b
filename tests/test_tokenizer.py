"""Tokenizers: bytes round-trip, GPT-2 BPE from a checkpoint's files, tiktoken as the fallback, saved beside
checkpoints, and a clear error when a folder has none."""
import json
import sys
import types

import pytest

from gptfast.tokenizer import BPETokenizer, ByteTokenizer, TiktokenTokenizer, load_tokenizer


def test_bytes_round_trip_and_saved_choice(tmp_path):
    tokenizer = ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text and max(tokenizer.encode(text)) < 256
    assert tokenizer.decode([0xC3]) == "\ufffd"  # a lone lead byte decodes to the replacement character
    tokenizer.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_from_vocab_and_merges(tmp_path):
    vocab = {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3, "Ġ": 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    tokenizer = load_tokenizer(str(tmp_path))
    assert isinstance(tokenizer, BPETokenizer) and tokenizer.eos_token_id == 3
    assert tokenizer.encode("ab") == [2] and tokenizer.decode([2, 0]) == "aba"
    copy = tmp_path / "copy"
    copy.mkdir()
    tokenizer.save(str(copy))
    assert load_tokenizer(str(copy)).encode("ab") == [2]


def test_tiktoken_fallback_and_clear_error(tmp_path, monkeypatch):
    fake = types.SimpleNamespace(get_encoding=lambda name: types.SimpleNamespace(
        n_vocab=50257, eot_token=50256, encode=lambda text, allowed_special: [ord(c) for c in text],
        decode=lambda ids: "".join(map(chr, ids))))
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    tokenizer = load_tokenizer(str(tmp_path))
    assert isinstance(tokenizer, TiktokenTokenizer) and tokenizer.eos_token_id == 50256
    tokenizer.save(str(tmp_path))
    assert isinstance(load_tokenizer(str(tmp_path)), TiktokenTokenizer)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # not installed
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "elsewhere"))


def test_an_unknown_saved_kind_is_refused(tmp_path):
    """No silent substitute: a marker naming a kind this gptfast does not know is an error, not bytes."""
    (tmp_path / "gptfast_tokenizer.json").write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(ValueError, match="tokenizer kind 'sentencepiece'"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "gptfast_tokenizer.json").write_text("[]")
    with pytest.raises(ValueError, match="gptfast_tokenizer.json holds a JSON list"):
        load_tokenizer(str(tmp_path))
