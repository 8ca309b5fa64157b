"""Packed training: documents packed into one row give the loss and gradients of the documents run one by one
(positions restart, no token attends across a boundary); batches cut at file starts and end-of-text tokens;
`gptfast train --pack` trains and resumes exactly."""
import numpy as np
import pytest
import torch

from gptfast import GPT, GPTConfig, backend
from gptfast.cli import main as cli
from gptfast.data import Batches, Corpus, prepare
from gptfast.packing import Packed
from gptfast.tokenizer import ByteTokenizer
from support import QUICK, read_log, step_records
from tolerance import DEVICE


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_a_packed_batch_has_the_loss_of_its_documents_alone(kernels):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, block_size=40, n_layer=2, n_head=3, n_embd=48)).to(DEVICE)
    lengths = [7, 1, 33, 16]
    ids = torch.randint(0, 61, (1, sum(lengths)), device=DEVICE)
    targets = torch.randint(0, 61, (1, sum(lengths)), device=DEVICE)
    packed = Packed.from_lengths(lengths, DEVICE, max_seqlen=40)
    with backend.use_backend(kernels):
        loss = model(ids, targets, packed)
        grads = torch.autograd.grad(loss, model.transformer.wpe.weight)[0]
        alone = sum(model(ids[:, a:b], targets[:, a:b]) * (b - a) for a, b in
                    zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist())) / sum(lengths)
        grads_alone = torch.autograd.grad(alone, model.transformer.wpe.weight)[0]
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, grads_alone, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="packed must be a gptfast.packing.Packed"):
        model(ids[:, :-1], targets[:, :-1], packed)


def test_batches_cut_windows_at_document_starts():
    tokens = np.arange(100, dtype=np.uint16)
    split = Corpus(tokens, np.array([0, 10, 11, 50], dtype=np.int64))
    batches = Batches(tokens, 3, 20, seed=0, starts=split.document_starts())
    x, y, packed = batches.next(torch.device("cpu"))
    assert x.shape == y.shape == (1, 60) and torch.equal(y, x + 1) and packed.max_seqlen == 20
    rows = x.view(3, 20)[:, 0].tolist()
    cuts = packed.cu_seqlens.tolist()
    for row, start in enumerate(rows):  # every document start inside a window begins a sequence there
        inside = [s - start + 20 * row for s in (10, 11, 50) if start < s < start + 20]
        assert set(inside) | {20 * row} <= set(cuts)
    assert torch.equal(packed.positions.view(-1)[torch.tensor(cuts[:-1])], torch.zeros(len(cuts) - 1).long())


def test_separator_tokens_start_documents():
    tokens = np.array([5, 6, 0, 7, 8, 9, 0, 1], dtype=np.uint16)
    assert Corpus(tokens, np.array([0])).document_starts(separator=0).tolist() == [0, 3, 7]


def test_the_token_cache_records_file_starts(home, corpus):
    splits = prepare(corpus, ByteTokenizer(), "bytes", progress=False)
    train = splits["train"]
    assert train.starts[0] == 0 and len(train.starts) == 11 and np.all(np.diff(train.starts) > 0)
    assert bytes(train.tokens[train.starts[1]:train.starts[1] + 12].astype(np.uint8)) == b"def function"


def test_train_pack_runs_and_resumes_exactly(home, corpus):
    """--pack trains, and a resume keeps it and continues exactly (the same packed batches, the same losses)."""
    common = ["--data", corpus, "--pack", "--lr-decay-iters", "4", "--log-interval", "1", "--eval-interval", "2",
              *QUICK]
    straight, split = str(home / "straight"), str(home / "split")
    assert cli(["train", "--out", straight, "--max-iters", "4", *common]) == 0
    assert cli(["train", "--out", split, "--max-iters", "2", *common]) == 0
    resume = ["--resume", "--log-interval", "1", "--kernels", "torch"]
    assert cli(["train", "--out", split, "--max-iters", "4", *resume]) == 0
    losses = lambda folder: [r["train_loss"] for r in step_records(folder)]
    assert len(losses(split)) == 4 and losses(split) == losses(straight)
    assert read_log(straight)[0]["val_loss"] > 0
