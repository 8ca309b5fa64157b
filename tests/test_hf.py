"""transformers' own models with attn_implementation="gptfast", tiny and randomly initialised: GPT-2 (dropout on
the attention weights in training), Llama (grouped-query heads), Mistral (a sliding window), Qwen2 (a window on
some layers, biased projections), Gemma 2 (logit softcapping, sliding and full layers alternating), Gemma 3, Qwen3
(query and key norms), Gemma 4 (a global head dim unlike the sliding one, a value norm without weight), DeepSeek-V3
(MLA: a value head dim unlike the query's), Llama 4 (chunked attention) and gpt-oss (sinks); with patch_hf their
LayerNorms and RMSNorms too. Logits and every gradient against the same model run by
transformers' eager attention in float64 under the accuracy rule; batched greedy generation with left padding
token for token; every attention call runs the Triton kernels (the backend is forced, and launches are counted)."""
import pytest
import torch
import transformers

from gptfast import backend
from gptfast.hf import _fused_norm, attention_forward, patch_hf, register
from gptfast.kernels import attention as kernels
from tolerance import DEVICE, assert_accurate

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)
MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, num_key_value_heads=2)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **COMMON, num_key_value_heads=2, sliding_window=5)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **COMMON, num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    # softcap 1.0 saturates these small scores, so a kernel that ignored it would fail
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **COMMON, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
        attn_logit_softcapping=1.0, final_logit_softcapping=None,
        layer_types=["sliding_attention", "full_attention"])),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **COMMON, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"])),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, num_key_value_heads=2,
                                                                            head_dim=16)),
    # a global head dim unlike the sliding layers' (512 in the real model: test_gemma4s_global_head_dim_512)
    "gemma4": lambda: transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(
        **COMMON, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], vocab_size_per_layer_input=97,
        hidden_size_per_layer_input=16)),
}
# Gemma 4's real global head dim, which the kernels run in 16-bit only (attention_core.kernel_gap)
WIDE_MODELS = {"gemma4_512": lambda: transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(
    **COMMON, num_key_value_heads=2, head_dim=16, global_head_dim=512, sliding_window=5,
    layer_types=["sliding_attention", "full_attention"], vocab_size_per_layer_input=97,
    hidden_size_per_layer_input=16))}


def deepseek_v3():
    """DeepSeek-V3's MLA: queries and keys 24 wide (16 without rotary + 8 with), values 16; its MoE layer's
    experts on the eager loop (grouped_mm has no float64)."""
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **COMMON, num_key_value_heads=4, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1))
    model.set_experts_implementation("eager")
    return model


def llama4():
    """Llama 4: chunked attention (chunks of 4 tokens) on its rotary layer, global attention on its NoPE layer,
    L2-normed queries and keys; its MoE layer's experts on the eager loop."""
    model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
        **COMMON, intermediate_size_mlp=96, num_key_value_heads=2, head_dim=16, num_local_experts=2,
        num_experts_per_tok=1, attention_chunk_size=4, no_rope_layers=[1, 0], moe_layers=[1]))
    model.set_experts_implementation("eager")
    return model


MODELS |= {"deepseek_v3": deepseek_v3, "llama4": llama4}


def gpt_oss():
    """gpt-oss: learned sinks (s_aux), which the kernels do not take yet, so its attention runs PyTorch; its experts
    on the eager loop (grouped_mm has no float64)."""
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **COMMON, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0}))
    model.set_experts_implementation("eager")
    return model


SINK_MODELS = {"gpt_oss": gpt_oss}


def build(name, implementation, dtype=torch.float32, patched=False):
    """The model with random norm weights too (transformers starts them at one, or Gemma's at zero); patched:
    through patch_hf, so its LayerNorms or RMSNorms run gptfast's kernel as well."""
    torch.manual_seed(0)
    model = (MODELS | SINK_MODELS | WIDE_MODELS)[name]()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name or ".ln_" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
            if param_name.endswith("sinks"):  # large enough to take most of a row's weight
                param.copy_(torch.randn_like(param) * 2)
    if patched:
        patch_hf(model)
        assert not any(type(m).__name__.endswith(("RMSNorm", "LayerNorm")) and type(m).__module__.startswith(
            ("transformers", "torch")) for m in model.modules()), "a norm was left unpatched"
    else:
        model.set_attn_implementation(implementation)
    return model.to(DEVICE, dtype)


@pytest.fixture
def launches(monkeypatch):
    """Counts the attention kernel's forward launches (a first call's and a planned call's: gptfast.attention_plan)."""
    count = {"forward": 0}
    launch = kernels.ForwardLaunch.run

    def counted(*args, **kwargs):
        count["forward"] += 1
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernels.ForwardLaunch, "run", counted)
    return count


def forward_backward(model, ids, grad_seed=1):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(grad_seed)).to(logits)
    (logits * weights).sum().backward()
    return {"logits": logits, **{name: p.grad for name, p in model.named_parameters() if p.grad is not None}}


# The models since Gemma 3 run patched only (their attention alone adds nothing the patched run does not cover,
# and each costs CI seconds in the interpreter).
TRAINING_RUNS = [(name, patched) for name in MODELS for patched in (False, True)
                 if patched or name in ("gpt2", "llama", "mistral", "qwen2", "gemma2")]


@pytest.mark.parametrize("name, patched", TRAINING_RUNS, ids=[
    f"{name}-{'attention+norms' if patched else 'attention'}" for name, patched in TRAINING_RUNS])
def test_training_forward_and_backward_match_eager(name, patched, launches, kernels_only):
    """Train mode (dropout 0, so results can be compared): logits and every parameter's gradient, with the
    attention on gptfast, and with patch_hf also its norms."""
    register()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = forward_backward(build(name, "gptfast", patched=patched).train(), ids)
    assert launches["forward"] == 2  # one per layer
    ref64 = forward_backward(build(name, "eager", torch.float64).train(), ids)
    lowp = forward_backward(build(name, "eager").train(), ids)
    for key, value in got.items():
        assert_accurate(f"{name} {key}", value, ref64[key], lowp[key], terms=16)


def left_padded_prompts():
    """Two prompts of 9 and 5 tokens, the shorter padded on the left, and generate's settings: 6 greedy tokens."""
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    return ids, dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_greedy_generation_with_left_padding(name, launches):
    """Two prompts of different lengths, the shorter padded on the left: the same tokens as eager attention."""
    register()
    ids, settings = left_padded_prompts()
    with torch.no_grad():
        expected = build(name, "eager").eval().generate(ids, **settings)
        with backend.use_backend("triton"):
            got = build(name, "gptfast").eval().generate(ids, **settings)
    assert torch.equal(got, expected)
    assert launches["forward"] == 2 * 6  # every layer at every step, none left to PyTorch


def test_without_padding_the_window_and_softcap_go_to_the_kernel(monkeypatch):
    """Unpadded, transformers builds no dense mask for "gptfast": the layer's window and softcap reach the kernel
    as flags (Gemma 2: one sliding and one full layer)."""
    register()
    seen = []
    launch = kernels.attention_forward

    def record(q, k, v, softmax_scale, features):
        seen.append((features.mask is None, features.window, features.softcap))
        return launch(q, k, v, softmax_scale, features)

    monkeypatch.setattr(kernels, "attention_forward", record)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad(), backend.use_backend("triton"):
        build("gemma2", "gptfast").eval()(ids)
    assert seen == [(True, (4, -1), 1.0), (True, (-1, -1), 1.0)]


def test_without_padding_llama4s_chunks_go_to_the_kernel(monkeypatch):
    """Unpadded, Llama 4's chunked layer reaches the kernel as its chunk size, its global layer without one, and
    neither with a dense mask; with left padding transformers' dense mask holds the chunks (counted from each
    sequence's first real token) and no chunk flag is added on top."""
    register()
    seen = []
    launch = kernels.attention_forward

    def record(q, k, v, softmax_scale, features):
        seen.append((features.mask is None, features.chunk))
        return launch(q, k, v, softmax_scale, features)

    monkeypatch.setattr(kernels, "attention_forward", record)
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    with torch.no_grad(), backend.use_backend("triton"):
        model = build("llama4", "gptfast").eval()
        model(ids)
        model(ids, attention_mask=padding)
    assert seen == [(True, 4), (True, 0), (False, 0), (False, 0)]


def test_gpt2_attention_dropout_runs_in_the_kernel(launches):
    """GPT-2 fine-tuned as configured (attn_pdrop 0.1): the kernels draw the dropout (fresh each call,
    repeatable under torch.manual_seed), and eval mode turns it off."""
    register()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.1,
                                     resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).to(DEVICE)
    model.set_attn_implementation("gptfast")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with backend.use_backend("triton"):
        outs = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            outs.append(model.train()(ids).logits)
        outs[0].sum().backward()
        plain = model.eval()(ids).logits
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], plain)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert launches["forward"] == 2 * 4


def test_gpt_oss_runs_its_sinks_on_the_kernels(kernels_only):
    """gpt-oss passes its sinks as s_aux: the kernels run them (under triton, so nothing falls back): logits and
    every gradient, the sinks' included, as eager attention's."""
    register()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    got = forward_backward(build("gpt_oss", "gptfast").train(), ids)
    ref64 = forward_backward(build("gpt_oss", "eager", torch.float64).train(), ids)
    lowp = forward_backward(build("gpt_oss", "eager").train(), ids)
    assert any(key.endswith("sinks") for key in got)
    for key, value in got.items():
        assert_accurate(f"gpt_oss {key}", value, ref64[key], lowp[key], terms=16)


def test_gemma4s_global_head_dim_512_runs_on_the_kernels(launches, kernels_only):
    """In bfloat16 (512-wide heads run 16-bit): logits and every gradient against eager attention in float64, under
    the rule with eager bfloat16 as the baseline; batched greedy generation with left padding gives eager's
    tokens. Every attention call runs the kernels (triton forced, launches counted)."""
    register()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    got = forward_backward(build("gemma4_512", "gptfast", torch.bfloat16).train(), ids)
    assert launches["forward"] == 2
    ref64 = forward_backward(build("gemma4_512", "eager", torch.float64).train(), ids)
    lowp = forward_backward(build("gemma4_512", "eager", torch.bfloat16).train(), ids)
    for key, value in got.items():
        assert_accurate(f"gemma4_512 {key}", value, ref64[key], lowp[key], terms=16)
    prompts, settings = left_padded_prompts()
    with torch.no_grad():
        expected = build("gemma4_512", "eager", torch.bfloat16).eval().generate(prompts, **settings)
        got = build("gemma4_512", "gptfast", torch.bfloat16).eval().generate(prompts, **settings)
    assert torch.equal(got, expected)
    assert launches["forward"] == 2 + 2 * 6


@pytest.mark.parametrize("keyword", [{"output_attentions": True}, {"relative_bias": torch.zeros(1)}],
                         ids=["output_attentions", "unknown"])
def test_a_keyword_it_does_not_handle_runs_the_models_eager_attention(keyword, monkeypatch):
    """A keyword that attention_forward neither honours nor knows to be harmless is never dropped: the model's own
    eager attention runs the call (with the causal mask the flags described), with a warning; under triton it
    raises."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    register()  # build's "gptfast" implementation: registered here too, not only by a test that ran before
    monkeypatch.setattr(backend, "_warned", set())
    module = build("llama", "gptfast").model.layers[0].self_attn
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 6, 16, generator=generator).to(DEVICE)
    k, v = (torch.randn(1, 2, 6, 16, generator=generator).to(DEVICE) for _ in range(2))
    with pytest.warns(UserWarning, match=next(iter(keyword))):
        out, weights = attention_forward(module, q, k, v, None, scaling=0.25, **keyword)
    causal = torch.zeros(6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), torch.finfo(q.dtype).min)
    expected, expected_weights = eager_attention_forward(module, q, k, v, causal.to(DEVICE), scaling=0.25)
    assert torch.equal(out, expected) and torch.equal(weights, expected_weights)
    with backend.use_backend("triton"), pytest.raises(NotImplementedError, match=next(iter(keyword))):
        attention_forward(module, q, k, v, None, scaling=0.25, **keyword)


@pytest.mark.parametrize("module, unit_offset", [
    ("gemma3.modeling_gemma3.Gemma3RMSNorm", True), ("gemma4.modeling_gemma4.Gemma4RMSNorm", False),
    ("llama.modeling_llama.LlamaRMSNorm", False)], ids=["gemma3", "gemma4", "llama"])
def test_each_rmsnorms_scale_convention_is_found_by_running_it(module, unit_offset):
    """Gemma 3 scales by 1 + weight, Gemma 4 (same family name) and Llama by weight: patch_hf's norm computes
    what the model's did (random weights, so neither convention passes for the other)."""
    import importlib
    path, name = module.rsplit(".", 1)
    norm = getattr(importlib.import_module(f"transformers.models.{path}"), name)(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=torch.Generator().manual_seed(1)))
    fused = _fused_norm(norm, norm.weight)
    assert fused.unit_offset is unit_offset
    hidden = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fused(hidden), norm(hidden))


def test_a_norm_that_takes_more_than_the_hidden_states_is_left_alone():
    """A gated RMSNorm (forward(hidden, gate), as Qwen3-Next's) cannot be probed: patch_hf leaves it."""
    class GatedRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.ones(8)), 1e-6

        def forward(self, hidden, gate):
            return hidden * torch.rsqrt(hidden.square().mean(-1, keepdim=True) + self.eps) * self.weight * gate

    assert _fused_norm(GatedRMSNorm(), torch.zeros(1)) is None
