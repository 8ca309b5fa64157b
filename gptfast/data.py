"""Training data: text files tokenized once into memory-mapped token arrays, and random windows drawn from them.

The default corpus needs no download and exists wherever Python runs: the standard library's own source files,
read as bytes. Files are split into train and val by file (every tenth file, in sorted order, is val), so val
measures text the model has not seen. Tokens are cached under ``GPTFAST_HOME/data`` (default
``~/.cache/gptfast/data``) as uint16, or uint32 for vocabularies over 65,536, keyed by the sources' paths, sizes
and modification times and by the tokenizer, so a second run starts at once.
"""
import hashlib
import json
import os
import sysconfig
from typing import NamedTuple

import numpy as np
import torch

from gptfast.files import atomic_write_text
from gptfast.packing import Packed
from gptfast.progress import Progress

FORMAT = 2  # of the token cache: 2 added each split's file starts (.starts.npy), which packed training needs
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".html", ".c", ".h", ".js", ".csv", ".tex", ".xml")


def gptfast_home():
    return os.environ.get("GPTFAST_HOME", os.path.join(os.path.expanduser("~"), ".cache", "gptfast"))


def stdlib_sources():
    """The .py files of this Python's standard library (not site-packages), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def text_sources(path):
    """The files to read for --data: the file itself, or the text files under a folder, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    files = sorted(os.path.join(folder, n) for folder, _, names in os.walk(path) for n in names
                   if n.endswith(TEXT_SUFFIXES))
    if not files:
        raise ValueError(f"--data {path}: the folder holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
    return files


def split_files(files):
    """(train files, val files): every tenth file is val. One file is split by position later instead."""
    if len(files) < 2:
        return files, []
    val = files[5::10] or files[-1:]
    held_out = set(val)
    return [f for f in files if f not in held_out], val


def _cache_key(files, tokenizer_name):
    digest = hashlib.sha256(tokenizer_name.encode())
    for path in files:
        try:
            stat = os.stat(path)
        except OSError as error:  # e.g. a link to nowhere
            raise OSError(f"cannot read {path}: {error.strerror}") from None
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def _tokenize(files, tokenizer, out_path, label, progress):
    """Writes the tokens of files, each followed by a newline, to out_path, and where each file's tokens start to
    out_path's .starts.npy (the documents packed training keeps apart); returns the token count."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    chunks = []
    shown = Progress(len(files)) if progress else None
    for i, path in enumerate(files):
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except OSError as error:
            raise OSError(f"cannot read {path}: {error}") from error
        chunks.append(np.asarray(tokenizer.encode(text + "\n"), dtype=dtype))
        if shown:
            shown.report(i + 1, f"tokenizing the {label} files")
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    tmp = f"{out_path}.{os.getpid()}.tmp"  # per process: two runs preparing one corpus never share a file
    tokens.tofile(tmp)
    os.replace(tmp, out_path)
    starts = np.cumsum([0] + [len(chunk) for chunk in chunks[:-1]]).astype(np.int64)
    with open(tmp, "wb") as f:
        np.save(f, starts)
    os.replace(tmp, _starts_path(out_path))
    return len(tokens)


def _starts_path(tokens_path):
    return tokens_path.removesuffix(".bin") + ".starts.npy"


class Corpus(NamedTuple):
    """One split: tokens (memory-mapped) and starts, the offset of each source file's first token (int64,
    sorted, from 0)."""
    tokens: np.ndarray
    starts: np.ndarray

    def document_starts(self, separator=None):
        """Where documents begin, for packed training: each source file, and after every separator token (one
        big file whose documents end with the tokenizer's end-of-text token)."""
        if separator is None:
            return self.starts
        after = np.flatnonzero(np.asarray(self.tokens) == separator) + 1
        return np.union1d(self.starts, after[after < len(self.tokens)])


def _cached_meta(meta_path):
    """The cache's meta.json, or None when it is missing or from before FORMAT."""
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    return meta if meta.get("format") == FORMAT else None


def prepare(data, tokenizer, tokenizer_name, progress=True):
    """Tokenizes the corpus once (default: the standard library) and returns {split: Corpus}."""
    files = stdlib_sources() if data is None else text_sources(data)
    folder = os.path.join(gptfast_home(), "data", _cache_key(files, tokenizer_name))
    meta_path = os.path.join(folder, "meta.json")
    if _cached_meta(meta_path) is None:
        os.makedirs(folder, exist_ok=True)
        train_files, val_files = split_files(files)
        sizes = {"train": _tokenize(train_files, tokenizer, os.path.join(folder, "train.bin"), "train", progress),
                 "val": _tokenize(val_files, tokenizer, os.path.join(folder, "val.bin"), "val", progress)}
        meta = {"format": FORMAT, "sources": len(files), "tokens": sizes, "vocab_size": tokenizer.vocab_size,
                "dtype": "uint16" if tokenizer.vocab_size <= 65536 else "uint32"}
        atomic_write_text(meta_path, json.dumps(meta))  # written last: its presence means the token files are complete
    meta = _cached_meta(meta_path)
    splits = {}
    for name in ("train", "val"):
        path = os.path.join(folder, f"{name}.bin")
        tokens = (np.memmap(path, dtype=meta["dtype"], mode="r") if meta["tokens"][name]
                  else np.zeros(0, dtype=meta["dtype"]))
        splits[name] = Corpus(tokens, np.load(_starts_path(path)))
    if len(splits["val"].tokens) == 0:  # one source file: hold out its last tenth
        tokens, starts = splits["train"]
        cut = len(tokens) * 9 // 10
        splits = {"train": Corpus(tokens[:cut], starts[starts < cut]),
                  "val": Corpus(tokens[cut:], np.union1d([0], starts[starts >= cut] - cut))}
    return splits


class Batches:
    """Random (B, T) windows of a token array and their next-token targets, drawn with a generator of its own so
    that a resumed run draws exactly the batches the uninterrupted one would have. shard=(rank, world): every rank
    draws the same B * world windows and keeps its own B of them, so the ranks together train on exactly the batch
    one process with batch_size B * world would (and each rank's generator holds the same state).

    starts (packed training): the sorted offsets where documents begin (Corpus.document_starts); each window is
    then cut at the documents it crosses, and the batch comes packed: (1, B * T) with a Packed whose sequences
    are the pieces, so no token attends across a document boundary (the targets stay the next tokens)."""

    def __init__(self, tokens, batch_size, block_size, seed, shard=(0, 1), starts=None):
        if len(tokens) < block_size + 2:
            raise ValueError(f"the data has {len(tokens)} tokens, too few for one window of --block-size "
                             f"{block_size}: give more data or a smaller --block-size")
        self.tokens, self.batch_size, self.block_size, self.starts = tokens, batch_size, block_size, starts
        self.rank, self.world = shard
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, device):
        """(x, y, packed) on device (a torch.device): (B, T) int64 inputs and targets, views of one copy, and
        packed None; or, with starts, (1, B * T) inputs and targets and their Packed."""
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size * self.world,),
                               generator=self.generator)[self.rank * self.batch_size:][:self.batch_size].tolist()
        windows = torch.stack([torch.from_numpy(self.tokens[s:s + self.block_size + 1].astype(np.int64))
                               for s in starts])
        if device.type == "cuda":
            # A copy from pageable memory waits for the GPU to finish its queue (a sync every step); from pinned
            # memory it runs asynchronously, so the next step is queued while this one computes (as nanoGPT).
            windows = windows.pin_memory()
        windows = windows.to(device, non_blocking=True)  # one copy; the inputs and targets are views of it
        if self.starts is None:
            return windows[:, :-1], windows[:, 1:], None
        packed = Packed.from_lengths(self._piece_lengths(starts), device, max_seqlen=self.block_size)
        return windows[:, :-1].reshape(1, -1), windows[:, 1:].reshape(1, -1), packed

    def _piece_lengths(self, window_starts):
        """The lengths of the documents' pieces in each window, window after window."""
        lengths = []
        for s in window_starts:
            inside = self.starts[np.searchsorted(self.starts, s, "right"):
                                 np.searchsorted(self.starts, s + self.block_size, "left")] - s
            lengths += np.diff([0, *inside.tolist(), self.block_size]).tolist()
        return lengths
