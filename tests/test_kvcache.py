"""flash_attn_with_kvcache and the split-KV decoding kernel against a float64 reference built from each sequence's
keys: every split count, plain and paged caches (pages of 16 and 32, scattered), new keys written in place,
rotary embedding (interleaved or not), left padding, GQA, Tq > 1, every feature, every dtype, float8 caches with
vLLM's scales (against the keys and values they dequantise to); bad input."""
import copy

import pytest
import torch

from gptfast import attention_core, backend
from gptfast.kvcache import flash_attn_with_kvcache
from support import BOTTOM_RIGHT, NONE, reference_attention, seed_of
from tolerance import DEVICE, DTYPES, assert_accurate


def rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding through complex numbers (independent of gptfast.kvcache.apply_rotary): x (T, H, D)."""
    half = cos.shape[1]
    rot = x[..., :2 * half].double()
    pairs = rot.unflatten(-1, (half, 2)) if interleaved else torch.stack((rot[..., :half], rot[..., half:]), -1)
    turned = torch.view_as_complex(pairs.contiguous()) * torch.polar(torch.ones_like(cos[positions]).double(),
                                                                     torch.atan2(sin, cos)[positions].double())[:, None]
    out = torch.view_as_real(turned)
    out = out.flatten(-2) if interleaved else torch.cat((out[..., 0], out[..., 1]), -1)
    return torch.cat((out.to(x.dtype), x[..., 2 * half:]), -1)


class Case:
    """Random sequences of keys laid into a plain or paged cache, new tokens, and the reference of a call."""

    def __init__(self, lengths, new, seqlen_q, heads, kv_heads, head_dim, dtype, page_size=None, seed=0,
                 head_dim_v=None):
        gen = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, dtype)
        self.lengths, self.dtype, self.page_size = lengths, dtype, page_size
        capacity = max(lengths) + new + 3
        head_dim_v = head_dim_v or head_dim
        self.q = rand(len(lengths), seqlen_q, heads, head_dim)
        self.keys, self.values = (rand(len(lengths), capacity, kv_heads, d) for d in (head_dim, head_dim_v))
        self.k, self.v = (rand(len(lengths), new, kv_heads, d) if new else None for d in (head_dim, head_dim_v))
        self.seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        self.block_table = None
        if page_size:  # scatter each sequence's pages over a shuffled pool
            pages = -(-capacity // page_size)
            order = torch.randperm(len(lengths) * pages, generator=gen).to(DEVICE)
            self.block_table = order.view(len(lengths), pages).to(torch.int32)
        self.angles = torch.rand(capacity + seqlen_q, 6, generator=gen).to(DEVICE) * 3

    def caches(self):
        if self.page_size is None:
            return self.keys.clone(), self.values.clone()
        pools = []
        for logical in (self.keys, self.values):
            padded = torch.zeros(len(self.lengths), self.block_table.shape[1] * self.page_size, *logical.shape[2:],
                                 dtype=self.dtype, device=DEVICE)
            padded[:, :logical.shape[1]] = logical
            pool = torch.zeros(self.block_table.numel(), self.page_size, *logical.shape[2:], dtype=self.dtype,
                               device=DEVICE)
            pool[self.block_table.long().flatten()] = padded.unflatten(1, (-1, self.page_size)).flatten(0, 1)
            pools.append(pool)
        return pools

    def reference(self, work, causal=False, window=(-1, -1), softcap=0.0, alibi=None, leftpad=None, rotary=None,
                  sinks=None, chunk=0):
        out = []
        for b, length in enumerate(self.lengths):
            keys, values, q = self.keys[b, :length], self.values[b, :length], self.q[b]
            if self.k is not None:
                k = self.k[b]
                if rotary is not None:
                    k = rotate(k, *rotary[:2], length + torch.arange(k.shape[0], device=DEVICE), rotary[2])
                keys, values = torch.cat((keys, k)), torch.cat((values, self.v[b]))
            if rotary is not None:
                steps = torch.arange(q.shape[0], device=DEVICE) if causal or window != (-1, -1) else 0
                q = rotate(q, *rotary[:2], length + steps * torch.ones(q.shape[0], dtype=torch.long,
                                                                        device=DEVICE), rotary[2])
            pad = 0 if leftpad is None else leftpad[b]
            slopes = None if alibi is None else alibi[b].to(work)
            out.append(reference_attention(q.transpose(0, 1).to(work), keys[pad:].transpose(0, 1).to(work),
                                           values[pad:].transpose(0, 1).to(work), BOTTOM_RIGHT if causal else NONE,
                                           window=window, softcap=softcap, alibi=slopes,
                                           sinks=None if sinks is None else sinks.to(work),
                                           chunk=chunk).transpose(0, 1))
        return torch.stack(out)


def check(case, num_splits=0, rotary_interleaved=None, leftpad=None, **options):
    k_cache, v_cache = case.caches()
    rotary = None
    kwargs = {}
    if rotary_interleaved is not None:
        cos, sin = case.angles.cos(), case.angles.sin()
        rotary = (cos, sin, rotary_interleaved)
        kwargs = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rotary_interleaved)
    pads = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32, device=DEVICE)
    out = flash_attn_with_kvcache(case.q, k_cache, v_cache, case.k, case.v, cache_seqlens=case.seqlens,
                                  block_table=case.block_table, cache_leftpad=pads, num_splits=num_splits,
                                  **kwargs, **options)
    spec = dict(causal=options.get("causal", False), window=options.get("window_size", (-1, -1)),
                softcap=options.get("softcap", 0.0), alibi=options.get("alibi_slopes"), leftpad=leftpad,
                rotary=rotary, sinks=options.get("sinks"), chunk=options.get("attention_chunk", 0))
    assert_accurate("out", out, case.reference(torch.float64, **spec), case.reference(case.dtype, **spec),
                    terms=case.q.shape[-1])
    return k_cache, v_cache


SHAPES = [  # (cache lengths, new tokens, Tq, heads, kv heads, head dim)
    ([1], 0, 1, 1, 1, 16), ([0, 7, 100], 1, 1, 4, 2, 24), ([257, 33], 0, 1, 6, 6, 64), ([37, 5], 5, 5, 6, 2, 80),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}new{}Tq{}H{}K{}D{}".format(*s))
def test_every_split_count_matches_the_reference(shape, causal, dtype):
    case = Case(*shape, dtype, seed=seed_of(shape, causal))
    with backend.use_backend("triton"):  # every split count in float32; one split and several in 16-bit
        for splits in (1, 2, 3, 7, 0) if dtype == torch.float32 else (1, 3):
            check(case, num_splits=splits, causal=causal)


@pytest.mark.parametrize("head_dim, head_dim_v, dtype, page_size", [
    (512, 512, torch.bfloat16, None), (300, 264, torch.float16, 16), (576, 512, torch.bfloat16, 16)])
def test_head_dims_past_256(head_dim, head_dim_v, dtype, page_size):
    """Gemma 4's global head dim 512; 300 with values 264 (both padded to 512) in pages; DeepSeek's absorbed MLA
    decoding, queries and keys 576 (a 512 block and a tail) and values 512: GQA, new tokens, several query rows,
    one split and several."""
    case = Case([30, 9], 2, 2, 4, 2, head_dim, dtype, page_size=page_size, seed=12, head_dim_v=head_dim_v)
    with backend.use_backend("triton"):
        for splits in (1, 3):
            check(case, num_splits=splits, causal=True)


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_cache_with_new_tokens(page_size, dtype):
    """New k, v land in the right slots of scattered pages, and the attention reads them back."""
    case = Case([20, 0, 45], 3, 3, 4, 1, 40, dtype, page_size=page_size, seed=page_size)
    with backend.use_backend("triton"):
        k_cache, _ = check(case, num_splits=2, causal=True)
    for b, length in enumerate(case.lengths):
        for i in range(3):
            assert torch.equal(slot(case, k_cache, b, length + i), case.k[b, i])


def slot(case, cache, b, position):
    """The (Hkv, D) keys or values at a sequence's position in case's plain or paged cache."""
    if case.page_size is None:
        return cache[b, position]
    return cache[case.block_table[b, position // case.page_size].item(), position % case.page_size]


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_rotary_and_leftpad(interleaved, causal):
    case = Case([30, 12], 2, 2, 4, 2, 32, torch.float32, seed=5)
    with backend.use_backend("triton"):
        check(case, num_splits=3, rotary_interleaved=interleaved, leftpad=[4, 0], causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_feature(dtype):
    case = Case([50, 9], 1, 1, 4, 2, 24, dtype, page_size=16, seed=9)
    alibi = torch.rand(2, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with backend.use_backend("triton"):
        check(case, num_splits=4, causal=True, window_size=(20, -1), softcap=5.0, alibi_slopes=alibi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sinks_and_a_value_head_dim(dtype):
    """gpt-oss's sinks and MLA's narrower values (D 40, Dv 24) through the split-KV kernel and its merge (which
    counts each sink once), paged, GQA, with a sequence whose cache is empty (its rows: 0, lse the sink)."""
    case = Case([50, 0, 9], 0, 2, 4, 2, 40, dtype, page_size=16, seed=11, head_dim_v=24)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with backend.use_backend("triton"):
        for splits in (1, 3):
            check(case, num_splits=splits, causal=True, sinks=sinks)
        k_cache, v_cache = case.caches()
        out, lse = flash_attn_with_kvcache(case.q, k_cache, v_cache, cache_seqlens=case.seqlens,
                                           block_table=case.block_table, num_splits=3, sinks=sinks,
                                           return_softmax_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(lse[1], sinks[:, None].expand(4, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunks_counted_from_each_sequence_start(dtype):
    """Llama 4's chunked attention while decoding: chunks of 8 positions counted from each sequence's first real
    key (after cache_leftpad), three new tokens whose rows straddle a chunk's end, paged, GQA, one split and
    several."""
    case = Case([50, 9, 21], 3, 3, 4, 2, 24, dtype, page_size=16, seed=13)
    with backend.use_backend("triton"):
        for splits in (1, 3):
            check(case, num_splits=splits, leftpad=[4, 0, 2], causal=True, attention_chunk=8)
        check(case, num_splits=2, leftpad=[4, 0, 2], attention_chunk=8)  # rows of two chunks, keys past each


def test_torch_path_matches_the_reference():
    case = Case([30, 3], 2, 2, 4, 2, 32, torch.float32, page_size=16, seed=2)
    with backend.use_backend("torch"):
        check(case, rotary_interleaved=False, causal=True, window_size=(8, -1))
        check(case, leftpad=[3, 0], causal=True, attention_chunk=4)


FP8 = torch.float8_e4m3fn


def fp8_of(x, scale):
    """x (..., Hkv, D) divided by its kv head's scale (Hkv,) and rounded to float8 e4m3 by PyTorch from float64,
    saturating at +-448."""
    return (x.double() / scale.double()[:, None]).clamp(-448, 448).to(FP8)


def fp8_cases(case, k_scale, v_scale):
    """(k_cache, v_cache, reference case): case's caches stored in float8 with per-head scales (Hkv,), and a copy
    of case whose keys and values, the new ones too, are what they dequantise to, in float64."""
    reference = copy.copy(case)
    for name, scale in (("keys", k_scale), ("values", v_scale), ("k", k_scale), ("v", v_scale)):
        setattr(reference, name, fp8_of(getattr(case, name), scale).double() * scale.double()[:, None])
    k_cache, v_cache = (fp8_of(cache, scale) for cache, scale in zip(case.caches(), (k_scale, v_scale)))
    return k_cache, v_cache, reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per", ["head", "tensor"])
def test_fp8_cache_matches_the_dequantised_reference(per, dtype):
    """float8 e4m3 caches with vLLM's k_scale and v_scale, per kv head (paged) or per tensor (plain): the output
    equals attention over the keys and values they dequantise to, under the usual rule (the kernel widens float8
    exactly and folds the scales into the softmax scale and the output); new tokens are quantised as written
    (saturating: the scales put some past 448); GQA, an empty cache, one split and several."""
    case = Case([0, 7, 100], 2, 2, 4, 2, 24, dtype, page_size=16 if per == "head" else None, seed=seed_of(per))
    gen = torch.Generator().manual_seed(seed_of(per, dtype))
    k_scale, v_scale = ((torch.rand(2 if per == "head" else (), generator=gen) * 0.006 + 0.006).to(DEVICE)
                        for _ in range(2))
    per_head = [scale.expand(2) for scale in (k_scale, v_scale)]
    k_cache, v_cache, reference = fp8_cases(case, *per_head)
    with backend.use_backend("triton"):
        for splits in (1, 3):
            k_written, v_written = k_cache.clone(), v_cache.clone()
            out = flash_attn_with_kvcache(case.q, k_written, v_written, case.k, case.v, cache_seqlens=case.seqlens,
                                          block_table=case.block_table, causal=True, num_splits=splits,
                                          k_scale=k_scale, v_scale=v_scale)
            assert_accurate("out", out, reference.reference(torch.float64, causal=True),
                            reference.reference(dtype, causal=True), terms=24)
    for b, length in enumerate(case.lengths):
        for i in range(2):
            assert torch.equal(slot(case, k_written, b, length + i).float(), fp8_of(case.k[b, i], per_head[0]).float())
            assert torch.equal(slot(case, v_written, b, length + i).float(), fp8_of(case.v[b, i], per_head[1]).float())


def test_fp8_cache_on_pytorch_and_before_sm_89(monkeypatch):
    """PyTorch's path dequantises the gathered keys; on an sm_80 GPU auto warns once and takes it, triton raises
    (Triton compiles float8 e4m3 from sm_89 on)."""
    case = Case([30, 3], 1, 1, 4, 2, 32, torch.bfloat16, page_size=16, seed=21)
    scale = torch.full((2,), 0.01, device=DEVICE)
    k_cache, v_cache, reference = fp8_cases(case, scale, scale)
    call = lambda: flash_attn_with_kvcache(case.q, k_cache.clone(), v_cache.clone(), case.k, case.v,  # noqa: E731
                                           cache_seqlens=case.seqlens, block_table=case.block_table, causal=True,
                                           k_scale=scale, v_scale=scale)
    expected = reference.reference(torch.float64, causal=True), reference.reference(torch.bfloat16, causal=True)
    with backend.use_backend("torch"):
        assert_accurate("out", call(), *expected, terms=32)
    monkeypatch.setattr(attention_core, "compute_capability", lambda device: (8, 0))
    backend._warned.clear()
    with backend.use_backend("triton"), pytest.raises(NotImplementedError, match="before sm_89"):
        call()
    with backend.use_backend("auto"), pytest.warns(UserWarning, match="before sm_89"):
        assert_accurate("out", call(), *expected, terms=32)


def test_bad_input_raises():
    case = Case([10, 4], 2, 1, 2, 2, 16, torch.float32)
    k_cache, v_cache = case.caches()
    call = lambda **kw: flash_attn_with_kvcache(case.q, **{"k_cache": k_cache, "v_cache": v_cache,
                                                           "cache_seqlens": case.seqlens, **kw})
    with pytest.raises(ValueError, match="new tokens fit"):
        call(k=case.k, v=case.v, cache_seqlens=torch.tensor([14, 0], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="cache_seqlens must be in"):
        call(cache_seqlens=torch.tensor([99, 0], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="cache_seqlens must be an int32"):
        call(cache_seqlens=case.seqlens.long())
    with pytest.raises(ValueError, match="pass k and v together"):
        call(k=case.k)
    with pytest.raises(ValueError, match="cache_batch_idx must index"):
        call(cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        pool = torch.zeros(4, 24, 2, 16, device=DEVICE)
        call(k_cache=pool, v_cache=pool, block_table=torch.zeros(2, 1, dtype=torch.int32, device=DEVICE))
    pool = torch.zeros(4, 16, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block_table must index the cache's 4 pages"):
        call(k_cache=pool, v_cache=pool, block_table=torch.tensor([[0], [4]], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="cannot be combined"):
        call(k_cache=pool, v_cache=pool, block_table=torch.zeros(2, 1, dtype=torch.int32, device=DEVICE),
             cache_batch_idx=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin must both be"):
        call(rotary_cos=torch.ones(20, 9, device=DEVICE), rotary_sin=torch.ones(20, 9, device=DEVICE))
    with pytest.raises(ValueError, match="num_splits"):
        call(num_splits=-1)
    one = torch.ones((), device=DEVICE)
    with pytest.raises(ValueError, match="apply to torch.float8_e4m3fn caches only"):
        call(k_scale=one)
    fp8_cache = k_cache.to(FP8)
    with pytest.raises(ValueError, match="must both be in q's dtype"):
        call(k_cache=fp8_cache)
    with pytest.raises(ValueError, match="not float8 queries"):
        flash_attn_with_kvcache(case.q.to(FP8), fp8_cache, fp8_cache, cache_seqlens=case.seqlens)
    with pytest.raises(ValueError, match=r"k_scale must be a float32 tensor of one value or of one per kv head \(2,\)"):
        call(k_cache=fp8_cache, v_cache=fp8_cache, k_scale=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="positive and finite"):
        call(k_cache=fp8_cache, v_cache=fp8_cache, v_scale=-one)
