"""What makes a repeated call cheap on the host, checked for the answers it could get wrong: attention_spec.describe's
memo of a call's description (every Features field must reach its key), gptfast.checked's memo of checks and
flash_attn_func's plans (gptfast.attention_plan)."""
import types

import pytest
import torch
from support import BOTTOM_RIGHT, NONE, TOP_LEFT, bthd, check_against_reference, random_qkv, seed_of

from gptfast import attention_plan, backend, checked, hf
from gptfast.attention import flash_attn_func, scaled_dot_product_attention
from gptfast.kernels import attention, attention_spec
from gptfast.kernels.attention_spec import CAUSAL_BOTTOM_RIGHT, Features, Flex
from gptfast.kernels.attention_tuning import forced_variants


BATCH, HEADS, SEQLEN_Q, SEQLEN_K, HEAD_DIM = 2, 4, 5, 7, 16


def qkv():
    q = torch.randn(BATCH, HEADS, SEQLEN_Q, HEAD_DIM)
    k, v = torch.randn(2, BATCH, 2, SEQLEN_K, HEAD_DIM)
    return q, k, v


def other_values():
    """For each Features field but flex, values other than its default (tensors made anew on each call)."""
    return {
        "causal": [CAUSAL_BOTTOM_RIGHT],
        "window": [(3, 0), (-1, 2)],
        "mask": [torch.ones(BATCH, 1, SEQLEN_Q, SEQLEN_K, dtype=torch.bool),
                 torch.zeros(BATCH, 1, SEQLEN_Q, SEQLEN_K), torch.zeros(BATCH, 1, SEQLEN_K, SEQLEN_Q).transpose(2, 3),
                 torch.zeros(1, 1, 1, SEQLEN_K)],
        "alibi_slopes": [torch.ones(HEADS), torch.ones(BATCH, HEADS), torch.ones(HEADS, BATCH).t()],
        "softcap": [5.0],
        "dropout_p": [0.25],
        "seed_offset": [torch.zeros(2, dtype=torch.int64)],
        "deterministic": [True],
        "varlen": [(torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32), 3, 4),
                   (torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32), 3, 7)],
        "sinks": [torch.zeros(HEADS)],
        "chunk": [4],
        "seqused_k": [torch.tensor([3, 2], dtype=torch.int32)],
        "descale": [torch.ones(2, BATCH, 2)],
        "shift": [-3, 5],
    }


def assert_same_call(got, expected):
    """Equal specs, shapes and kwargs; tensors in kwargs the same objects or equal views."""
    assert got.spec == expected.spec and got.shape == expected.shape
    assert got.kwargs.keys() == expected.kwargs.keys()
    for name, value in expected.kwargs.items():
        if isinstance(value, torch.Tensor):
            assert got.kwargs[name].data_ptr() == value.data_ptr(), name
            assert got.kwargs[name].shape == value.shape and got.kwargs[name].stride() == value.stride(), name
        else:
            assert got.kwargs[name] == value, name


def test_every_features_field_reaches_describes_key():
    """For each field, calls that differ from those already described only in that field (its default, then each
    other value in turn: a mask of another stride after one of the same shape) get Calls equal to ones worked out
    afresh (a field missing from the memo's key would get an earlier call's). Flex calls are not memoized."""
    assert set(other_values()) == set(Features._fields) - {"flex"}, "a new Features field needs values here"
    q, k, v = qkv()
    for field, values in other_values().items():
        attention_spec._described.clear()
        for features in [Features(), *(Features(**{field: value}) for value in values), Features()]:
            assert_same_call(attention_spec.describe(q, k, v, features, 0.5),
                             attention_spec._describe(q, k, v, features, 0.5))
    assert attention_spec._signature(q, k, v, Features(flex=Flex()), 0.5) is None


def test_a_described_call_carries_its_own_tensors():
    """Two calls of one signature share the Call's switches but each launches with its own mask, slopes and sinks;
    the memo keeps no tensor alive."""
    q, k, v = qkv()
    attention_spec._described.clear()
    for _ in range(2):
        mask, slopes, sinks = torch.zeros(1, 1, SEQLEN_Q, SEQLEN_K), torch.ones(HEADS), torch.zeros(HEADS)
        features = Features(mask=mask, alibi_slopes=slopes, sinks=sinks)
        call = attention_spec.describe(q, k, v, features, 0.5)
        assert call.kwargs["MASK"].data_ptr() == mask.data_ptr()
        assert call.kwargs["ALIBI"].data_ptr() == slopes.data_ptr() and call.kwargs["SINKS"] is sinks
    (kept,) = attention_spec._described.values()
    assert not any(isinstance(value, torch.Tensor) for value in kept.kwargs.values())


def test_checked_once_tells_values_apart_by_type():
    """1, 1.0 and True, and tuples of them, are different signatures; so are tensors of other dtypes or shapes but
    not tensors of other values."""
    assert len({checked.signature(args) for args in [(1,), (1.0,), (True,), ((1, 0),), ((1.0, 0),)]}) == 5
    assert checked.signature((torch.zeros(2),)) == checked.signature((torch.ones(2),))
    assert checked.signature((torch.zeros(2),)) != checked.signature((torch.zeros(3),))
    assert checked.signature((torch.zeros(2),)) != checked.signature((torch.zeros(2, dtype=torch.float64),))


def test_checked_once_runs_a_check_once_per_signature():
    runs = []

    def check(x, flag):
        runs.append(flag)
        if flag == "bad":
            raise ValueError("bad flag")
        return x.shape[0] * 2

    assert [checked.checked_once(check, torch.zeros(3), "ok") for _ in range(3)] == [6, 6, 6]
    assert checked.checked_once(check, torch.zeros(4), "ok") == 8
    for _ in range(2):
        with pytest.raises(ValueError, match="bad flag"):
            checked.checked_once(check, torch.zeros(3), "bad")
    assert checked.checked_once(check, torch.zeros(3), ["unhashable"]) == 6
    assert runs == ["ok", "ok", "bad", "bad", ["unhashable"]]


def test_a_checked_call_still_rejects_bad_arguments():
    """After a valid call is memoized, the same call with one argument made invalid still raises."""
    q, k, v = (torch.randn(1, 4, 2, 16) for _ in range(3))
    flash_attn_func(q, k, v, window_size=(2, 0))
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(2.0, 0))
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=torch.tensor([2, 0, 1]))
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="attention_chunk"):  # a tensor's value is no part of a signature
        flash_attn_func(q, k, v, attention_chunk=torch.tensor(4))


# The plans of flash_attn_func and scaled_dot_product_attention (gptfast.attention_plan): a repeated call launches
# what its first call worked out.
PLANNED = {  # (B, Hq, Hkv, Tq, Tk, D, Dv), flash_attn_func's options
    "causal gqa lse": ((2, 4, 2, 7, 7, 16, 16), dict(causal=True, return_lse=True)),
    "window softcap Tq<Tk": ((1, 2, 2, 5, 19, 24, 24), dict(causal=True, window_size=(6, 0), softcap=5.0)),
    "chunk Dv<D deterministic": ((1, 2, 1, 9, 9, 20, 12), dict(attention_chunk=4, deterministic=True,
                                                               softmax_scale=0.3, return_lse=True)),
}


def full_paths(monkeypatch):
    """A list that gets a None each time a call works out its forward launch (the full path: a plan does not)."""
    calls, launch = [], attention.forward_launch
    monkeypatch.setattr(attention, "forward_launch", lambda *args: calls.append(None) or launch(*args))
    return calls


def run_and_differentiate(attend, q, k, v, seed):
    """attend(q, k, v) on copies of q, k, v: its outputs and the gradients of q, k and v from random gradients
    of each output (out, and lse when it returns one)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    result = attend(*leaves)
    outputs = result if isinstance(result, tuple) else (result,)
    generator = torch.Generator().manual_seed(seed)
    torch.autograd.backward(outputs, [torch.randn(t.shape, generator=generator) for t in outputs])
    return [*outputs, *(t.grad for t in leaves)]


def assert_planned_as_run(attend, q, k, v, monkeypatch):
    """The second call of attend on q, k, v runs its plan and gives exactly what the first (the full path:
    checks, custom op, launcher) gave, outputs and gradients."""
    full = full_paths(monkeypatch)
    first = run_and_differentiate(attend, q, k, v, 0)
    assert full
    full.clear()
    second = run_and_differentiate(attend, q, k, v, 0)
    assert not full
    for got, expected in zip(second, first, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("case", list(PLANNED))
def test_a_planned_flash_attn_call_gives_the_full_paths_results(case, monkeypatch, kernels_only):
    """A plan's results are the full path's; on fresh inputs they match the float64 reference. The inputs are
    views of a fused projection (B, T, 3, H, D), as GPT models pass them."""
    (batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v), options = PLANNED[case]
    q, k, v = random_qkv(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, torch.float32, seed_of(case),
                         head_dim_v)
    assert_planned_as_run(lambda *qkv: flash_attn_func(*qkv, **options), *bthd(q, k, v), monkeypatch)
    causal = BOTTOM_RIGHT if options.get("causal") else NONE
    spec = dict(scale=options.get("softmax_scale"), window=options.get("window_size", (-1, -1)),
                softcap=options.get("softcap", 0.0), chunk=options.get("attention_chunk", 0))
    check_against_reference(q, k, v, causal, lambda *qkv: flash_attn_func(
        *bthd(*qkv), **{**options, "return_lse": False}).transpose(1, 2), seed=1, **spec)


def test_a_planned_sdpa_call_gives_the_full_paths_results(monkeypatch, kernels_only):
    """gptfast's scaled_dot_product_attention, top-left causal with grouped-query heads on (B, H, T, D) inputs."""
    q, k, v = random_qkv(1, 4, 2, 6, 11, 16, torch.float32, seed_of("sdpa"))
    sdpa = lambda *qkv: scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=True)  # noqa: E731
    assert_planned_as_run(sdpa, q, k, v, monkeypatch)
    check_against_reference(q, k, v, TOP_LEFT, sdpa, seed=1)


def test_a_planned_transformers_call_gives_the_full_paths_results(monkeypatch, kernels_only):
    """The transformers integration's attention (gptfast.hf), as a Mistral-like layer calls it: causal, a sliding
    window, softcapping, grouped-query heads, (B, H, T, D) inputs and a (B, T, H, D) output."""
    q, k, v = random_qkv(2, 4, 2, 9, 9, 16, torch.float32, seed_of("hf"))
    layer = types.SimpleNamespace(is_causal=True)
    attend = lambda *qkv: hf.attention_forward(layer, *qkv, None, scaling=0.3, sliding_window=4,  # noqa: E731
                                               softcap=20.0)[0]
    assert_planned_as_run(attend, q, k, v, monkeypatch)
    check_against_reference(q, k, v, BOTTOM_RIGHT, lambda *qkv: attend(*qkv).transpose(1, 2), seed=1, scale=0.3,
                            window=(3, -1), softcap=20.0)


def test_a_plan_serves_only_its_own_signature_and_switches(monkeypatch):
    """After a call is planned: k in another dtype still raises, the torch backend and forced variants do not take
    the plan (forced variants empty them), and a k whose address is not 16-byte aligned (TMA's need) runs the
    full path, with the same result."""
    full = full_paths(monkeypatch)
    q, k, v = (torch.randn(1, 5, 2, 16) for _ in range(3))

    def full_path(k):
        """flash_attn_func(q, k, v, causal=True) and whether it took the full path."""
        full.clear()
        return flash_attn_func(q, k, v, causal=True), bool(full)
    expected, _ = full_path(k)
    out, took_full_path = full_path(k)
    assert torch.equal(out, expected) and not took_full_path
    with pytest.raises(TypeError, match="dtype"):
        flash_attn_func(q, k.half(), v, causal=True)
    with backend.use_backend("torch"):
        torch.testing.assert_close(flash_attn_func(q, k, v, causal=True), expected)
    with forced_variants(forward="pointers"):
        assert not attention_plan._plans and full_path(k)[1]
    assert not attention_plan._plans and full_path(k)[1] and not full_path(k)[1]
    shifted = torch.empty(k.numel() + 1)[1:].view(k.shape).copy_(k)  # 4 bytes past an aligned address
    out, took_full_path = full_path(shifted)
    assert torch.equal(out, expected) and took_full_path
