"""What the test modules share, beside tests/tolerance.py's accuracy rule: the float64 attention oracle and the
inputs it is fed, parametrize ids and seeds, the backend fixture, and the training tests' settings and logs."""
import json
import math
import os
import zlib

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

from gptfast import backend
from gptfast.attention_core import draw_dropout_seed
from tolerance import DEVICE, assert_accurate

NONE, TOP_LEFT, BOTTOM_RIGHT = "none", "top_left", "bottom_right"


def shape_id(shape):
    """The parametrize id of an attention shape (batch, heads, kv_heads, Tq, Tk, head_dim)."""
    return "B{}H{}K{}Tq{}Tk{}D{}".format(*shape)


def seed_of(*case):
    """A seed of its own for each parametrized case, stable across runs and processes (unlike hash())."""
    return zlib.crc32(repr(case).encode())


@pytest.fixture
def kernels_only():
    """The test's calls run gptfast's kernels or raise: no silent fallback to PyTorch (GPTFAST_BACKEND=triton)."""
    with backend.use_backend("triton"):
        yield


def reference_attention(q, k, v, causal=NONE, scale=None, window=(-1, -1), softcap=0.0, alibi=None, mask=None,
                        keep=None, dropout_p=0.0, sinks=None, chunk=0, need_lse=False):
    """Plain attention in q's dtype: scores, masked softmax in float32 (as torch's math backend), weighted sum.
    q: (..., Hq, Tq, D), k and v: (..., Hkv, Tk, D). A row that sees no key gives 0. window is flash-attn's
    (bottom-right aligned; causal sets its right side to 0), alibi float32 (B, Hq), mask bool or additive and
    broadcastable to the scores, keep the dropout's keep mask (B, Hq, Tq, Tk), sinks (Hq,) a logit per head in
    every row's softmax that takes no value, chunk > 0 the size of the chunks outside which query i (at position
    i + Tk - Tq) sees no key. need_lse: return (out, lse), lse (..., Hq, Tq) the log-sum-exp of each row's scores
    (the sink's included) in float32 or float64, +inf for a row that sees nothing."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)
    scores = ((q @ k.transpose(-1, -2)) * scale).to(work)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    tq, tk = q.shape[-2], k.shape[-2]
    j_minus_i = torch.arange(tk, device=q.device)[None, :] - torch.arange(tq, device=q.device)[:, None]
    if alibi is not None:
        scores = scores - alibi[..., None, None].to(work) * (j_minus_i - (tk - tq)).abs().to(work)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(work)
    left, right = window
    if causal != NONE:
        right = 0
    diagonal = tk - tq if causal != TOP_LEFT else 0
    if right >= 0:
        scores = scores.masked_fill(j_minus_i > diagonal + right, float("-inf"))
    if left >= 0:
        scores = scores.masked_fill(j_minus_i < diagonal - left, float("-inf"))
    if chunk:
        positions = torch.arange(tq, device=q.device)[:, None] + tk - tq
        key_chunks = torch.arange(tk, device=q.device)[None, :] // chunk
        scores = scores.masked_fill(torch.div(positions, chunk, rounding_mode="floor") != key_chunks, float("-inf"))
    if sinks is None:
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    else:
        scores = torch.cat([scores, sinks.to(work)[:, None, None].expand(*scores.shape[:-1], 1)], dim=-1)
        weights = torch.softmax(scores, dim=-1)[..., :-1]
    if keep is not None:
        weights = weights * keep / (1 - dropout_p)
    out = weights.to(q.dtype) @ v
    if need_lse:
        lse = torch.logsumexp(scores, dim=-1)
        return out, lse.masked_fill(lse == float("-inf"), float("inf"))
    return out

def random_qkv(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed, head_dim_v=None):
    """Standard-normal q (B, Hq, Tq, D), k (B, Hkv, Tk, D) and v (B, Hkv, Tk, Dv), Dv = head_dim_v or D."""
    gen = torch.Generator().manual_seed(seed)
    make = lambda h, t, d: torch.randn(batch, h, t, d, generator=gen).to(DEVICE, dtype)
    return (make(heads, seqlen_q, head_dim), make(kv_heads, seqlen_k, head_dim),
            make(kv_heads, seqlen_k, head_dim_v or head_dim))

def mask_args(causal, seqlen_q, seqlen_k):
    if causal == TOP_LEFT:
        return dict(is_causal=True)
    if causal == BOTTOM_RIGHT:
        return dict(attn_mask=causal_lower_right(seqlen_q, seqlen_k))
    return {}

def check_against_reference(q, k, v, causal, run, seed=0, mask=None, sinks=None, **spec):
    """run(q, k, v[, mask][, sinks]) -> out with q's layout (..., Hq, Tq, D). Checks the output and dq, dk, dv,
    the gradient of an additive mask that requires grad and that of sinks (each passed to run after v when
    given, in that order); spec goes to reference_attention."""
    leaves = {"q": q, "k": k, "v": v}
    if mask is not None and mask.requires_grad:
        leaves["mask"] = mask
    if sinks is not None:
        leaves["sinks"] = sinks
    inputs = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    out = run(*inputs.values())
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    out.backward(grad_out)
    results = {"out": out, **{f"d{n}": t.grad for n, t in inputs.items()}}

    def reference(dtype):
        ins = {n: t.detach().to(dtype).requires_grad_() for n, t in leaves.items()}
        fixed_mask = ins.get("mask", mask if mask is None or mask.dtype == torch.bool else mask.to(dtype))
        ref = reference_attention(ins["q"], ins["k"], ins["v"], causal, mask=fixed_mask, sinks=ins.get("sinks"),
                                  **spec)
        ref.backward(grad_out.to(dtype))
        return {"out": ref, **{f"d{n}": t.grad for n, t in ins.items()}}

    ref64, lowp = reference(torch.float64), reference(q.dtype)
    for name, value in results.items():
        assert value.dtype == leaves.get(name[1:], q).dtype
        assert_accurate(name, value, ref64[name], lowp[name], terms=q.shape[-1], dtype=q.dtype)

def bthd(*tensors):
    """(B, H, T, D) -> flash-attn's (B, T, H, D) views."""
    return [t.transpose(1, 2) for t in tensors]

def kernel_keep_mask(seed, shape, dropout_p):
    """The keep mask the kernels drew in a call made right after torch.manual_seed(seed)."""
    from gptfast.kernels.attention import dropout_keep_mask
    torch.manual_seed(seed)
    return dropout_keep_mask(draw_dropout_seed(torch.device(DEVICE)), *shape, dropout_p)


# `gptfast train` in the tests: a tiny model on the CPU, and what its run folder logs.
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--device", "cpu", "--warmup-iters", "2"]
QUICK = ["--eval-iters", "1", "--kernels", "torch", *TINY]


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_records(folder):
    return [r for r in read_log(folder) if "train_loss" in r]
