"""Tokenizers for gptfast models, saved beside every checkpoint gptfast writes so that a checkpoint folder is
self-contained: a byte-level one (vocab 256, needs no files) for models trained by `gptfast train`, and GPT-2's
byte-level BPE from a checkpoint's own tokenizer.json or vocab.json + merges.txt, or from tiktoken's "gpt2"
encoding when the folder has no tokenizer files but tiktoken has its own (cached) files.

Every tokenizer has encode(text) -> list[int], decode(ids) -> str, vocab_size, eos_token_id (or None), and
save(folder)."""
import json
import os
import shutil

from gptfast.files import read_json_object

MARKER_FILE = "gptfast_tokenizer.json"  # names a tokenizer that has no files of its own
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
        with open(os.path.join(folder, MARKER_FILE), "w") as f:
            json.dump({"kind": "bytes"}, f)


class BPETokenizer:
    """GPT-2's byte-level BPE through the tokenizers library, from the files of a checkpoint folder."""

    def __init__(self, folder):
        import tokenizers
        self.folder = folder
        path = os.path.join(folder, "tokenizer.json")
        try:
            if os.path.isfile(path):
                self.backend = tokenizers.Tokenizer.from_file(path)
            else:
                path = os.path.join(folder, "vocab.json and merges.txt")
                self.backend = tokenizers.ByteLevelBPETokenizer(os.path.join(folder, "vocab.json"),
                                                               os.path.join(folder, "merges.txt"))
        except Exception as error:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{path}: not a readable tokenizer ({str(error).splitlines()[0]}); copy the model's "
                             "tokenizer files again") from None
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


class TiktokenTokenizer:
    """GPT-2's BPE through tiktoken (its files come from tiktoken's own cache). Saving it records the choice, so a
    checkpoint names its tokenizer even without BPE files."""

    def __init__(self):
        import tiktoken
        self.encoding = tiktoken.get_encoding("gpt2")
        self.vocab_size = self.encoding.n_vocab
        self.eos_token_id = self.encoding.eot_token

    def encode(self, text):
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.encoding.decode(list(ids))

    def save(self, folder):
        with open(os.path.join(folder, MARKER_FILE), "w") as f:
            json.dump({"kind": "tiktoken", "encoding": "gpt2"}, f)


MARKED_KINDS = {"bytes": ByteTokenizer, "tiktoken": TiktokenTokenizer}


def load_tokenizer(folder):
    """The tokenizer saved in a checkpoint folder, else tiktoken's GPT-2 encoding where tiktoken can load it."""
    marker = os.path.join(folder, MARKER_FILE)
    if os.path.isfile(marker):
        kind = read_json_object(marker).get("kind")
        if kind not in MARKED_KINDS:
            raise ValueError(f"{marker} names the tokenizer kind {kind!r}, which this gptfast does not know "
                             f"(expected one of {', '.join(MARKED_KINDS)}); was it written by a newer gptfast?")
        return MARKED_KINDS[kind]()
    if os.path.isfile(os.path.join(folder, "tokenizer.json")) or all(
            os.path.isfile(os.path.join(folder, name)) for name in ("vocab.json", "merges.txt")):
        return BPETokenizer(folder)
    try:
        return TiktokenTokenizer()
    except Exception as error:  # not installed, or its files are not cached and cannot be downloaded
        raise FileNotFoundError(
            f"{folder} holds no tokenizer (expected {MARKER_FILE}, tokenizer.json, or vocab.json with merges.txt) "
            f"and tiktoken's gpt2 encoding is not available ({type(error).__name__}); copy the model's tokenizer "
            "files into the folder") from error
