"""flash_attn_varlen_func with block_table (paged prefill) against the float64 reference run on each sequence's
keys alone: the split-KV kernel reading the pool (no copy: checked by making the gather fail), lengths 0, 1 and
mixes, Tq != Tk, GQA, odd head dims, Dv != D, every dtype, causal or not, seqused_k, every feature it takes;
gradients (through the gathered path) reaching the pool; bad input."""

import pytest
import torch

from gptfast import backend
from gptfast import varlen
from gptfast.attention import flash_attn_varlen_func
from support import BOTTOM_RIGHT, NONE, reference_attention, seed_of
from tolerance import DEVICE, DTYPES, assert_accurate


def cumulative(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


class PagedCase:
    """Packed queries and a shuffled pool of pages holding each sequence's keys (counts[b] of them, in order)."""

    def __init__(self, lens_q, counts, heads, kv_heads, head_dim, dtype, page_size=16, seed=0, head_dim_v=None):
        gen = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, dtype)
        self.lens_q, self.counts, self.page_size = lens_q, counts, page_size
        pages = -(-max(counts + [1]) // page_size) + 1  # a spare page past the longest
        self.block_table = torch.randperm(len(counts) * pages, generator=gen).view(len(counts), pages).to(
            DEVICE, torch.int32)
        self.q = rand(sum(lens_q), heads, head_dim)
        self.pools = [rand(len(counts) * pages, page_size, kv_heads, d) for d in (head_dim, head_dim_v or head_dim)]

    def rows(self, b):
        """Pool rows (pool.flatten(0, 1)) of sequence b's keys, from the block table alone."""
        table = self.block_table[b].tolist()
        return [table[j // self.page_size] * self.page_size + j % self.page_size for j in range(self.counts[b])]

    def run(self, **options):
        return flash_attn_varlen_func(self.q, *self.pools, cumulative(self.lens_q), cumulative(self.counts),
                                      max(self.lens_q), max(self.counts), block_table=self.block_table, **options)

    def reference(self, q, pools, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None,
                  attention_chunk=0, **_):
        outs, start = [], 0
        for b, length in enumerate(self.lens_q):
            k, v = (pool.flatten(0, 1)[self.rows(b)].transpose(0, 1) for pool in pools)
            outs.append(reference_attention(q[start:start + length].transpose(0, 1), k, v,
                                            BOTTOM_RIGHT if causal else NONE, window=window_size, softcap=softcap,
                                            alibi=None if alibi_slopes is None else alibi_slopes[b], sinks=sinks,
                                            chunk=attention_chunk).transpose(0, 1))
            start += length
        return torch.cat(outs)


def no_gather(*args):
    raise AssertionError("the paged kernel path gathered the pages")


MIXES = [  # (lengths of q, key counts, heads, kv heads, head dim)
    ([1], [1], 1, 1, 16), ([7, 0, 1], [7, 3, 40], 4, 2, 24), ([20, 1, 37], [50, 17, 0], 2, 1, 40),
]


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "q{}k{}H{}K{}D{}".format(*m))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_paged_prefill_reads_the_pool(mix, dtype, causal, monkeypatch):
    case = PagedCase(*mix, dtype, seed=seed_of(mix, dtype, causal))
    monkeypatch.setattr(varlen, "gather_pages", no_gather)
    with backend.use_backend("triton"):
        out = case.run(causal=causal)
    ref64 = case.reference(case.q.double(), [p.double() for p in case.pools], causal=causal)
    assert out.dtype == dtype and out.shape == case.q.shape
    assert_accurate("out", out, ref64, case.reference(case.q, case.pools, causal=causal), terms=mix[4])


def test_paged_prefill_with_every_feature(monkeypatch):
    """seqused_k, a window, softcapping, per-sequence ALiBi, sinks and chunks; values 8 wide, keys 24; pages of
    32."""
    heads = 4
    case = PagedCase([9, 1, 30], [40, 6, 33], heads, 2, 24, torch.float32, page_size=32, seed=7, head_dim_v=8)
    gen = torch.Generator().manual_seed(8)
    used = [25, 6, 0]
    options = dict(causal=True, window_size=(11, 0), softcap=3.0, attention_chunk=16,
                   alibi_slopes=torch.rand(3, heads, generator=gen).to(DEVICE),
                   sinks=torch.randn(heads, generator=gen).to(DEVICE))
    monkeypatch.setattr(varlen, "gather_pages", no_gather)
    with backend.use_backend("triton"):
        out = case.run(seqused_k=torch.tensor(used, dtype=torch.int32, device=DEVICE), **options)
    case.counts = used
    ref = case.reference(case.q.double(), [p.double() for p in case.pools], **options)
    assert_accurate("out", out, ref, case.reference(case.q, case.pools, **options), terms=24)


def test_paged_prefill_of_absorbed_mla(monkeypatch):
    """DeepSeek's absorbed MLA over pages: queries and keys 576 wide (the decoding kernel's 512 block and tail),
    values 512, one kv head, chunks, read in place."""
    case = PagedCase([5, 1], [20, 9], 4, 1, 576, torch.bfloat16, seed=11, head_dim_v=512)
    monkeypatch.setattr(varlen, "gather_pages", no_gather)
    with backend.use_backend("triton"):
        out = case.run(causal=True, attention_chunk=8)
    ref64 = case.reference(case.q.double(), [p.double() for p in case.pools], causal=True, attention_chunk=8)
    lowp = case.reference(case.q, case.pools, causal=True, attention_chunk=8)
    assert_accurate("out", out, ref64, lowp, terms=576)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_prefill_gradients_reach_the_pool(dtype):
    """With gradients the pages are gathered and run flash_attn_varlen_func's kernels: dq and each pool's gradient
    (zero on pages no sequence reads) against the reference."""
    case = PagedCase([7, 20], [30, 20], 4, 2, 24, dtype, seed=seed_of("grad", dtype))
    leaves = [t.clone().requires_grad_() for t in (case.q, *case.pools)]
    with backend.use_backend("triton"):
        out = flash_attn_varlen_func(leaves[0], *leaves[1:], cumulative(case.lens_q), cumulative(case.counts),
                                     20, 30, causal=True, block_table=case.block_table)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(grad_out)

    def reference(work):
        ins = [t.to(work).requires_grad_() for t in (case.q, *case.pools)]
        ref = case.reference(ins[0], ins[1:], causal=True)
        ref.backward(grad_out.to(work))
        return [ref] + [t.grad for t in ins]

    ref64, lowp = reference(torch.float64), reference(dtype)
    for name, value, exact, low in zip(("out", "dq", "dk_pool", "dv_pool"), [out] + [t.grad for t in leaves],
                                       ref64, lowp):
        assert_accurate(name, value, exact, low, terms=24)


@pytest.mark.parametrize("change, message", [
    (dict(block_table=torch.zeros(2, 3)), "block_table must be an int32 tensor"),
    (dict(block_table=torch.full((2, 3), 6, dtype=torch.int32)), "must index the pool's 6 pages"),
    (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), "has 20 keys but block_table gives each 1 pages"),
    (dict(page_size=8), "power of two from 16"),
])
def test_bad_paged_input_raises(change, message):
    page_size = change.pop("page_size", 16)
    case = PagedCase([3, 5], [20, 5], 2, 2, 16, torch.float32, page_size=page_size)
    table = change.get("block_table", case.block_table)
    with pytest.raises(ValueError, match=message):
        flash_attn_varlen_func(case.q, *case.pools, cumulative([3, 5]), cumulative([20, 5]), 5, 20,
                               block_table=table.to(DEVICE))
