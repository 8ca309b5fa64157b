"""gptfast.flex against float64 PyTorch: every built-in mod and compositions of them, forward, lse and every
gradient (the bias table's too), over odd lengths, Tq != Tk, GQA and every dtype; block lists against a
brute-force evaluation; torch's own flex_attention; and bad input."""
import pytest
import torch
import triton
import triton.language as tl  # noqa: F401 (the interpreter wants it in a @triton.jit function's globals)

from gptfast import backend
from gptfast.flex import (BlockMask, MaskMod, Mod, ScoreMod, and_masks, create_block_mask, flex_attention, noop_mask,
                          or_masks)
from gptfast.flex_mods import (alibi_score, causal_mask, chunked_mask, document_mask, prefix_lm_mask,
                               relative_bias_score, sliding_window_mask, softcap_score)
from support import seed_of
from tolerance import DEVICE, DTYPES, assert_accurate

# Dense masks written out here, independently of the mods' own PyTorch twins: (Tq, Tk) bool from q and kv index
# columns/rows.
IDS = torch.tensor([0] * 9 + [1] * 30 + [2] * 3 + [3] * 58)  # 100 positions in four documents
MASKS = {
    "causal": (lambda: causal_mask, lambda q, kv: kv <= q),
    "window": (lambda: and_masks(causal_mask, sliding_window_mask(6)), lambda q, kv: (kv <= q) & (q - kv <= 6)),
    "prefix_lm": (lambda: or_masks(causal_mask, prefix_lm_mask(11)), lambda q, kv: (kv <= q) | (kv < 11)),
    "document": (lambda: and_masks(causal_mask, document_mask(IDS.to(DEVICE))),
                 lambda q, kv: (kv <= q) & (IDS[q.clamp(max=99)] == IDS[kv.clamp(max=99)])),
    "chunked": (lambda: and_masks(causal_mask, chunked_mask(16)), lambda q, kv: (kv <= q) & (q // 16 == kv // 16)),
    "noop": (lambda: noop_mask, lambda q, kv: torch.ones_like(q + kv, dtype=torch.bool)),
}
# (batch, heads, kv heads, Tq, Tk, head dim)
SHAPES = [(1, 2, 2, 100, 100, 32), (1, 4, 2, 37, 53, 24), (1, 1, 1, 1, 1, 16), (2, 2, 1, 7, 7, 8)]


def inputs(shape, dtype, seed):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    make = lambda h, t: torch.randn(batch, h, t, head_dim, generator=generator).to(DEVICE, dtype)
    return make(heads, seqlen_q), make(kv_heads, seqlen_k), make(kv_heads, seqlen_k)


def reference(q, k, v, visible=None, score=None, scale=None):
    """Attention in q's dtype (softmax in float32, float64 for float64) with a dense (Tq, Tk) mask and a score
    function of (scores, q_idx, kv_idx, head): (out, lse), -inf lse and 0 out for rows that see nothing."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = q.to(work) @ k.to(work).transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    rows = torch.arange(q.shape[2], device=q.device)[:, None]
    keys = torch.arange(k.shape[2], device=q.device)[None, :]
    if score is not None:
        scores = score(scores, rows, keys, torch.arange(q.shape[1], device=q.device)[:, None, None])
    if visible is not None:
        scores = scores.masked_fill(~visible(rows, keys), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = (torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ v.to(work)).to(q.dtype)
    return out, lse.float()


def check(shape, dtype, seed, score_mod=None, mask=None, visible=None, score=None, block_size=16,
          params=(), block_mask=None):
    """flex_attention's out, lse and gradients (q, k, v and params) against reference in float64 and in dtype;
    the block mask is block_mask, or create_block_mask's of mask."""
    q, k, v = inputs(shape, dtype, seed)
    if mask is not None:
        block_mask = create_block_mask(mask, shape[0], None, shape[3], shape[4], device=DEVICE, BLOCK_SIZE=block_size)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                              return_lse=True)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse).masked_fill(lse == float("-inf"), 0.0)
    grads = torch.autograd.grad((out, lse), leaves + list(params), (grad_out, grad_lse))
    results = {}
    for name, precision in (("64", torch.float64), ("lowp", dtype)):
        inputs_p = [t.detach().to(precision).requires_grad_() for t in leaves]
        params_p = [p.detach().clone().requires_grad_() for p in params]
        out_p, lse_p = reference(*inputs_p, visible, score and (lambda s, r, c, h: score(s, r, c, h, *params_p)))
        grads_p = torch.autograd.grad((out_p, lse_p.masked_fill(lse_p == float("-inf"), 0.0)),
                                      inputs_p + params_p, (grad_out.to(precision), grad_lse), allow_unused=True)
        results[name] = (out_p, lse_p, *grads_p)
    names = ("out", "lse", "dq", "dk", "dv", *(f"dparam{i}" for i in range(len(params))))
    for name, actual, exact, lowp in zip(names, (out, lse, *grads), results["64"], results["lowp"]):
        finite = torch.isfinite(exact)
        assert torch.equal(torch.isfinite(actual), finite), f"{name}: infinite where the reference is not"
        assert_accurate(name, actual[finite], exact[finite], lowp[finite], terms=max(shape[3:]), dtype=dtype)


@pytest.mark.parametrize("mask_name, dtype", [(name, DTYPES[i % 3]) for i, name in enumerate(MASKS)], ids=str)
def test_masks(mask_name, dtype, kernels_only):
    """Each mask in one dtype (the dtypes take turns: each costs seconds in the interpreter)."""
    mask, visible = MASKS[mask_name]
    check(SHAPES[0], dtype, seed_of(mask_name, dtype), mask=mask(), visible=visible)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_odd_shapes(shape, kernels_only):
    """Lengths 1 and 7, Tq != Tk, GQA, head dims 8 and 24, mask blocks of 16 x 32 rows and keys."""
    check(shape, torch.bfloat16, seed_of(shape), mask=and_masks(causal_mask, sliding_window_mask(9)),
          visible=lambda q, kv: (kv <= q) & (q - kv <= 9), block_size=(16, 32))


SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score_name", ["softcap", "alibi", "relative_bias"])
def test_score_mods(score_name, dtype, kernels_only):
    """Each built-in score mod under a causal block mask; the relative bias table gets its gradient."""
    shape = SHAPES[1]
    if score_name == "softcap":
        score_mod, score, params = softcap_score(1.5), lambda s, r, c, h: 1.5 * torch.tanh(s / 1.5), ()
    elif score_name == "alibi":
        score_mod = alibi_score(SLOPES.to(DEVICE))
        score, params = lambda s, r, c, h: s - SLOPES.to(s)[h] * (r - c).abs(), ()
    else:
        table = torch.randn(shape[1], 2 * 53 - 1, device=DEVICE, requires_grad=True)
        score_mod, params = relative_bias_score(table), (table,)
        score = lambda s, r, c, h, table: s + table[h, r - c + 52]
    check(shape, dtype, seed_of(score_name, dtype), score_mod=score_mod, mask=causal_mask,
          visible=lambda q, kv: kv <= q, score=score, params=params)


def brute_force_states(visible, batch, seqlen_q, seqlen_k, block_size):
    """Block states from a dense (B, Tq, Tk) mask, block by block."""
    rows, columns = -(-seqlen_q // block_size[0]), -(-seqlen_k // block_size[1])
    states = torch.zeros((batch, 1, rows, columns), dtype=torch.uint8)
    for b in range(batch):
        for r in range(rows):
            for c in range(columns):
                block = visible[b, r * block_size[0]:(r + 1) * block_size[0], c * block_size[1]:(c + 1) * block_size[1]]
                inside = block.shape == block_size
                states[b, 0, r, c] = 2 if inside and block.all() else 1 if block.any() else 0
    return states


@pytest.mark.parametrize("block_size", [(16, 16), (32, 16), (16, 64)], ids=str)
@pytest.mark.parametrize("length", [1, 7, 100])
def test_block_states(length, block_size):
    """create_block_mask's kernel against brute force, per-batch documents, and its coarsening to 64."""
    ids = torch.stack([IDS[:length], IDS.flip(0)[:length]])
    mask = and_masks(causal_mask, document_mask(ids.to(DEVICE)))
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = torch.stack([(kv <= q) & (ids[b][q] == ids[b][kv]) for b in range(2)])
    block_mask = create_block_mask(mask, 2, None, length, length, device=DEVICE, BLOCK_SIZE=block_size)
    assert torch.equal(block_mask.states.cpu(), brute_force_states(visible, 2, length, length, block_size))
    coarse = block_mask.coarsened(64)
    assert coarse.block_size == (64, 64)
    assert torch.equal(coarse.states.cpu(), brute_force_states(visible, 2, length, length, (64, 64)))


def test_against_torch_flex(kernels_only):
    """The same document mask through torch's own flex_attention (its unfused eager path) and gptfast's."""
    from torch.nn.attention import flex_attention as torch_flex
    q, k, v = inputs((1, 2, 2, 100, 100, 16), torch.float32, 7)
    ids = IDS.to(DEVICE)
    torch_mask = torch_flex.create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (ids[qi] == ids[ki]), None, None,
                                              100, 100, device=DEVICE)
    expected = torch_flex.flex_attention(q, k, v, block_mask=torch_mask)
    ours = flex_attention(q, k, v, block_mask=create_block_mask(and_masks(causal_mask, document_mask(ids)), None,
                                                                None, 100, 100, device=DEVICE, BLOCK_SIZE=32))
    torch.testing.assert_close(ours, expected, rtol=2e-6, atol=2e-6)


def test_reference_path_matches_kernels():
    """Under the torch backend flex_attention runs the mods' PyTorch twins: the same results as the kernels."""
    q, k, v = inputs((1, 2, 2, 37, 37, 16), torch.float32, 3)
    mask = create_block_mask(or_masks(causal_mask, prefix_lm_mask(5)), None, None, 37, 37, device=DEVICE)
    with backend.use_backend("triton"):
        kernels = flex_attention(q, k, v, score_mod=softcap_score(2.0), block_mask=mask)
    with backend.use_backend("torch"):
        torch_mask = create_block_mask(or_masks(causal_mask, prefix_lm_mask(5)), None, None, 37, 37, device=DEVICE)
        assert torch.equal(torch_mask.states, mask.states)
        pytorch = flex_attention(q, k, v, score_mod=softcap_score(2.0), block_mask=torch_mask)
    torch.testing.assert_close(kernels, pytorch, rtol=1e-5, atol=1e-5)


@triton.jit
def _three_arguments(batch, head, q_idx):
    return q_idx >= 0


@triton.jit
def _doubled(score, batch, head, q_idx, kv_idx, args):
    return score * 2.0


def test_bad_input(kernels_only):
    q, k, v = inputs((1, 2, 2, 20, 20, 16), torch.float32, 5)
    with pytest.raises(TypeError, match="mask_mod _three_arguments takes 3 parameters"):
        create_block_mask(_three_arguments, None, None, 20, 20, device=DEVICE)
    with pytest.raises(TypeError, match="mask_mod must be a gptfast.flex.MaskMod"):
        create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 20, 20, device=DEVICE)
    with pytest.raises(ValueError, match="BLOCK_SIZE must be a power of two"):
        create_block_mask(causal_mask, None, None, 20, 20, device=DEVICE, BLOCK_SIZE=24)
    with pytest.raises(ValueError, match=r"made for \(Q_LEN, KV_LEN\) = \(20, 30\)"):
        flex_attention(q, k, v, block_mask=create_block_mask(causal_mask, None, None, 20, 30, device=DEVICE))
    with pytest.raises(ValueError, match=r"block_mask has \(B, H\) = \(3, 1\)"):
        flex_attention(q, k, v, block_mask=create_block_mask(causal_mask, 3, None, 20, 20, device=DEVICE))
    with pytest.raises(TypeError, match="block_mask must be None, a gptfast.flex.BlockMask"):
        flex_attention(q, k, v, block_mask=torch.ones(20, 20, dtype=torch.bool))
    with pytest.raises(TypeError, match="score_mod must be None"):
        flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s)
    with pytest.raises(ValueError, match="mask_mod document reads a tensor on meta"):
        create_block_mask(document_mask(torch.zeros(20, device="meta")), None, None, 20, 20, device=DEVICE)


def test_backward_needs_derivatives(kernels_only):
    """A score mod without a derivative is forward-only, and says so on backward(); so is a tensor argument that
    requires grad without an arg_grad."""
    q, k, v = (t.requires_grad_() for t in inputs((1, 1, 1, 20, 20, 16), torch.float32, 6))
    out = flex_attention(q, k, v, score_mod=_doubled)
    with pytest.raises(RuntimeError, match="score_mod _doubled has no derivative"):
        out.sum().backward()
    slopes = torch.ones(1, device=DEVICE, requires_grad=True)
    alibi = alibi_score(slopes)
    with pytest.raises(RuntimeError, match="an argument of score_mod alibi requires grad"):
        flex_attention(q, k, v, score_mod=ScoreMod(Mod(alibi.mod.fn, (slopes,)), alibi.grad)).sum().backward()


def test_mod_without_reference_needs_kernels():
    """A user's @triton.jit mod has no PyTorch twin: the torch backend says what to do instead of guessing."""
    q, k, v = inputs((1, 1, 1, 20, 20, 16), torch.float32, 8)
    with backend.use_backend("torch"), pytest.raises(NotImplementedError, match="has no PyTorch reference"):
        flex_attention(q, k, v, score_mod=ScoreMod(Mod(_doubled)))


def test_block_mask_compositions_are_flat():
    """and/or of compositions stay one disjunction of conjunctions, which is what the kernels unroll."""
    window = and_masks(causal_mask, sliding_window_mask(4))
    composed = and_masks(or_masks(window, prefix_lm_mask(3)), chunked_mask(8))
    assert [len(term) for term in composed.terms] == [3, 2]
    assert isinstance(composed, MaskMod) and isinstance(noop_mask, MaskMod)
    assert BlockMask._fields == ("states", "block_size", "seq_lengths", "mask_mod")


@pytest.mark.skipif(not backend.INTERPRETER, reason="counts the interpreter's launches (a GPU compiles and times "
                                                    "every tile, which would hide the count)")
def test_no_recompilation_across_lengths_and_layouts(kernels_only, monkeypatch):
    """What Triton's JIT would compile for the forward kernel (its specialization key, from the binder it derives
    for sm_90) across calls with other lengths, batches, document layouts and softcaps: one kernel. Triton
    specialises an int argument that is 1 or a multiple of 16 (even inside a tuple, where do_not_specialize does
    not reach), so a length of 64 is a second kernel, and the last."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from gptfast.kernels.attention import attention_forward_kernel
    kernel = JITFunction(attention_forward_kernel.fn)
    binder = create_function_from_signature(kernel.signature, kernel.params, CUDABackend(GPUTarget("cuda", 90, 32)))
    keys = set()
    run = InterpretedFunction.run

    def record(self, *args, **kwargs):
        if self.fn is attention_forward_kernel.fn:
            keys.add(str(binder(**{**kwargs, "BLOCK_M": 16, "BLOCK_N": 16, "TMA": False, "PERSISTENT": False})[1]))
        return run(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", record)
    for batch, length, documents in ((2, 37, 2), (3, 100, 5), (2, 203, 1), (2, 64, 3), (3, 64, 2)):
        q, k, v = inputs((batch, 2, 2, length, length, 16), torch.bfloat16, length)
        ids = torch.arange(length, device=DEVICE) * documents // length
        block_mask = create_block_mask(and_masks(causal_mask, document_mask(ids)), None, None, length, length,
                                       device=DEVICE, BLOCK_SIZE=16)
        flex_attention(q, k, v, block_mask=block_mask, score_mod=softcap_score(float(length)))
        assert len(keys) == (1 if length != 64 else 2)


def test_single_pass_backward_gives_the_table_its_gradient(kernels_only):
    """The argument gradient is added by the dk/dv kernel, so the single-pass backward (dq by atomics) has it too."""
    from gptfast.kernels.attention_tuning import forced_variants
    shape = SHAPES[1]
    table = torch.randn(shape[1], 2 * 53 - 1, device=DEVICE, requires_grad=True)
    with forced_variants(backward="single_pass"):
        check(shape, torch.float32, 11, score_mod=relative_bias_score(table), mask=causal_mask,
              visible=lambda q, kv: kv <= q, score=lambda s, r, c, h, table: s + table[h, r - c + 52], params=(table,))


TORCH_IDS = torch.stack([torch.arange(45) // 11, torch.arange(45) // 7]).to(DEVICE)


def torch_block_mask(block_size):
    """A torch BlockMask (torch's create_block_mask) of per-batch documents, bottom-right shifted, for Tq 37, Tk 45."""
    from torch.nn.attention import flex_attention as torch_flex
    return torch_flex.create_block_mask(lambda b, h, q, kv: (kv <= q + 3) & (TORCH_IDS[b, q] == TORCH_IDS[b, kv]), 2,
                                        None, 37, 45, device=DEVICE, BLOCK_SIZE=block_size)


@pytest.mark.parametrize("block_size", [16, 32], ids=str)
def test_torch_block_mask(block_size, kernels_only):
    """torch's own BlockMask runs unchanged: its lists drive the sparsity and its mask_mod (a PyTorch function of
    scalars) is evaluated on its partial blocks; per-batch documents, Tq != Tk (keys past a block's end)."""
    check((2, 2, 2, 37, 45, 16), torch.bfloat16, block_size, block_mask=torch_block_mask(block_size),
          visible=lambda q, kv: (kv <= q + 3) & (TORCH_IDS[:, q] == TORCH_IDS[:, kv])[:, None])


def test_torch_block_mask_in_float32_runs_pytorch():
    """Its bits spill the float32 tiles, so float32 calls with a torch BlockMask run PyTorch, visibly."""
    q, k, v = inputs((2, 2, 2, 37, 45, 16), torch.float32, 9)
    with backend.use_backend("triton"), pytest.raises(NotImplementedError,
                                                      match="float32 inputs with a torch BlockMask"):
        flex_attention(q, k, v, block_mask=torch_block_mask(16))
    with backend.use_backend("auto"), pytest.warns(UserWarning, match="float32 inputs with a torch BlockMask"):
        out = flex_attention(q, k, v, block_mask=torch_block_mask(16))
    expected, _ = reference(q.double(), k.double(), v.double(),
                            visible=lambda r, c: (c <= r + 3) & (TORCH_IDS[:, r] == TORCH_IDS[:, c])[:, None])
    torch.testing.assert_close(out, expected.float(), rtol=2e-6, atol=2e-6)
