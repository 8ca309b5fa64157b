"""Tokenizers for gptfast models, saved beside every checkpoint gptfast writes so that a checkpoint folder is
self-contained: a byte-level one (vocab 256, needs no files) for models trained by `gptfast train`, and GPT-2's
byte-level BPE from a checkpoint's own tokenizer.json or vocab.json + merges.txt.

Every tokenizer has encode(text) -> list[int], decode(ids) -> str, vocab_size, eos_token_id (or None), and
save(folder)."""
import json
import os
import shutil

BYTES_FILE = "gptfast_tokenizer.json"
BPE_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255. Decoding replaces an incomplete or invalid sequence with U+FFFD."""
    vocab_size = 256
    eos_token_id = None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, folder):
        with open(os.path.join(folder, BYTES_FILE), "w") as f:
            json.dump({"kind": "bytes"}, f)


class BPETokenizer:
    """GPT-2's byte-level BPE through the tokenizers library, from the files of a checkpoint folder."""

    def __init__(self, folder):
        import tokenizers
        self.folder = folder
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            self.backend = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        else:
            self.backend = tokenizers.ByteLevelBPETokenizer(os.path.join(folder, "vocab.json"),
                                                           os.path.join(folder, "merges.txt"))
        self.vocab_size = self.backend.get_vocab_size()
        self.eos_token_id = self.backend.token_to_id("<|endoftext|>")

    def encode(self, text):
        return self.backend.encode(text).ids

    def decode(self, ids):
        return self.backend.decode(list(ids))

    def save(self, folder):
        for name in BPE_FILES:
            source = os.path.join(self.folder, name)
            if os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(os.path.join(folder, name)):
                shutil.copyfile(source, os.path.join(folder, name))


def load_tokenizer(folder):
    """The tokenizer saved in a checkpoint folder."""
    if os.path.isfile(os.path.join(folder, BYTES_FILE)):
        return ByteTokenizer()
    if os.path.isfile(os.path.join(folder, "tokenizer.json")) or all(
            os.path.isfile(os.path.join(folder, name)) for name in ("vocab.json", "merges.txt")):
        return BPETokenizer(folder)
    raise FileNotFoundError(f"{folder} holds no tokenizer: expected {BYTES_FILE}, tokenizer.json, or vocab.json "
                            "with merges.txt")
