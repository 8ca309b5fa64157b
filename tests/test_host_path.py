"""What makes a repeated call cheap on the host, checked for the answers it could get wrong: attention_spec.describe's
memo of a call's description (every Features field must reach its key) and gptfast.checked's memo of checks."""
import pytest
import torch

from gptfast import checked
from gptfast.attention import flash_attn_func
from gptfast.kernels import attention_spec
from gptfast.kernels.attention_spec import CAUSAL_BOTTOM_RIGHT, Features, Flex

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
