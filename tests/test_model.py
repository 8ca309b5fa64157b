"""The GPT-2 model on gptfast's kernels against transformers' GPT2LMHeadModel on the same small random checkpoints
(odd sizes: head dim 24), generation with and without the KV cache, the Hugging Face integration, bad input."""
import os

import pytest
import torch
import transformers

from gptfast import GPT, GPTConfig, backend
from gptfast.hf import patch_hf, register
from gptfast.layernorm import LayerNorm
from gptfast.decoder import decode_step, prefill
from gptfast.model import KVCache
from tolerance import DEVICE


def make_hf_checkpoint(folder, seed=0, n_embd=72, n_head=3, n_layer=2, vocab_size=101, n_positions=48,
                       pickled=False, default_special_tokens=False):
    """A random transformers GPT-2 saved to folder; returns the model (eval mode, float32). default_special_tokens:
    keep GPT2Config's bos/eos (50256, whatever the vocabulary), else the last token id."""
    torch.manual_seed(seed)
    special = {} if default_special_tokens else dict(bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # transformers initialises biases and LayerNorms to constants: make them random too
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    if pickled:  # the older pytorch_model.bin format (transformers 5 no longer writes it)
        torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
        os.remove(os.path.join(folder, "model.safetensors"))
    return model


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("gpt2-tiny"))
    return folder, make_hf_checkpoint(folder)


def prompt(batch=2, length=9, vocab_size=101, seed=1):
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(checkpoint):
    folder, hf_model = checkpoint
    model = GPT.from_pretrained(folder).eval()
    idx = prompt()
    with torch.no_grad(), backend.use_backend("triton"):
        logits = model.to(DEVICE)(idx.to(DEVICE))
    expected = hf_model(idx).logits
    assert logits.shape == (2, 9, 101)
    assert relative_error(logits.cpu(), expected) < 1e-4


def test_pytorch_bin_checkpoint_loads(tmp_path):
    hf_model = make_hf_checkpoint(str(tmp_path), seed=3, n_embd=48, n_head=2, pickled=True)
    assert os.path.isfile(tmp_path / "pytorch_model.bin")
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = prompt(1, 5)
    with torch.no_grad(), backend.use_backend("torch"):
        assert relative_error(model(idx), hf_model(idx).logits) < 1e-4


def test_a_checkpoint_with_transformers_default_eos_loads(tmp_path):
    """GPT2LMHeadModel.save_pretrained for a vocabulary of 301 keeps bos/eos 50256, which transformers loads: so
    does gptfast, as no end-of-text token, with a warning; a GPTConfig set so by hand is still refused."""
    hf_model = make_hf_checkpoint(str(tmp_path), seed=4, n_embd=48, n_head=2, vocab_size=301,
                                  default_special_tokens=True)
    assert hf_model.config.eos_token_id == 50256
    with pytest.warns(UserWarning, match="eos_token_id 50256"):
        model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.eos_token_id is None
    idx = prompt(1, 5, vocab_size=301)
    with torch.no_grad(), backend.use_backend("torch"):
        assert relative_error(model(idx), hf_model(idx).logits) < 1e-4
    with pytest.raises(ValueError, match="eos_token_id"):
        GPTConfig(vocab_size=301, eos_token_id=50256)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_transformers(checkpoint, use_cache):
    folder, hf_model = checkpoint
    model = GPT.from_pretrained(folder).eval().to(DEVICE)
    idx = prompt(2, 6)
    with backend.use_backend("triton"):
        ours = model.generate(idx.to(DEVICE), max_new_tokens=12, do_sample=False, use_cache=use_cache)
    theirs = hf_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.cpu(), theirs)


def test_sampling_is_reproducible_and_top_k_one_is_greedy(checkpoint):
    model = GPT.from_pretrained(checkpoint[0]).eval().to(DEVICE)
    idx = prompt(2, 4).to(DEVICE)
    draws = [model.generate(idx, 8, top_k=20, top_p=0.9, temperature=0.8,
                            generator=torch.Generator(DEVICE).manual_seed(5)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (2, 12)
    assert torch.equal(model.generate(idx, 8, top_k=1), model.generate(idx, 8, do_sample=False))


def test_generation_stops_at_eos_and_at_block_size(checkpoint):
    model = GPT.from_pretrained(checkpoint[0]).eval()
    idx = prompt(1, 4)
    greedy = model.generate(idx, 10, do_sample=False)
    eos = greedy[0, 6].item()  # the third new token
    stopped = model.generate(idx, 10, do_sample=False, eos_token_id=eos)
    first = (greedy[0, 4:] == eos).nonzero()[0].item()
    assert stopped.shape[1] == 4 + first + 1 and stopped[0, -1].item() == eos
    with pytest.warns(UserWarning, match="block size"):
        out = model.generate(prompt(1, 40), 20, do_sample=False)
    assert out.shape[1] == model.config.block_size


def test_generation_under_autocast(checkpoint):
    """Under bf16 autocast the keys come out of the projection in bf16; the cache follows them."""
    model = GPT.from_pretrained(checkpoint[0]).eval().to(DEVICE)
    with torch.no_grad():  # at the checkpoint's scale every prompt continues with one token; here they differ
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.mul_(10)
    idx = prompt(2, 5).to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        cached = model.generate(idx, 4, do_sample=False)
        uncached = model.generate(idx, 4, do_sample=False, use_cache=False)
        assert cached.shape == (2, 9) and torch.equal(cached[:, :5], idx)
        for row in range(2):
            parted = (cached[row, 5:] != uncached[row, 5:]).nonzero()
            if len(parted):  # two greedy runs in bf16 may part only where the two best logits nearly tie
                step = 5 + parted[0].item()
                best, second = model(cached[row:row + 1, :step])[0, -1].float().topk(2).values
                assert best - second <= 2 ** -6 * max(best.abs().item(), 1.0), f"row {row} parted at {step}"


def test_prompts_of_different_lengths_generate_as_if_alone(checkpoint):
    """A batch of prompts of lengths 1 to 17, no padding: each sequence's greedy tokens equal transformers' for that
    prompt alone (the prefill packs them, each decode step reads each sequence's own cache length)."""
    folder, hf_model = checkpoint
    model = GPT.from_pretrained(folder).eval().to(DEVICE)
    prompts = [prompt(1, length, seed=length)[0] for length in (5, 1, 17)]
    with backend.use_backend("triton"):
        batched = model.generate(prompts, max_new_tokens=6, do_sample=False)
    for ids, got in zip(prompts, batched):
        theirs = hf_model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=6,
                                   do_sample=False, pad_token_id=100)
        assert torch.equal(got.cpu(), theirs[0])


def test_the_static_cache_holds_each_sequence_at_its_length(checkpoint):
    model = GPT.from_pretrained(checkpoint[0]).eval().to(DEVICE)
    cache = KVCache(model.config, 2, 12, torch.device(DEVICE))
    prompts = [prompt(1, 3)[0].to(DEVICE), prompt(1, 7)[0].to(DEVICE)]
    with torch.no_grad():
        prefill(model, prompts, cache)
        assert cache.seqlens.tolist() == [3, 7] and cache.keys.shape == (2, 2, 12, 3, 24)
        decode_step(model, torch.tensor([1, 2], device=DEVICE), cache)
    assert cache.seqlens.tolist() == [4, 8]
    assert cache.keys[:, 0, 4:].abs().sum() == 0 and cache.keys[:, 0, 3].abs().sum() > 0


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_an_fp8_cache_decodes_close_to_the_full_one(checkpoint, kernels):
    """KVCache(dtype=float8 e4m3): float8 keys and values with per-(layer, head) scales from the prompts; the
    logits of three decoding steps (the same tokens fed to both) stay within 1% of the float32 cache's (0.1-0.15%
    measured), and differ from them (the float8 cache is what is read)."""
    model = GPT.from_pretrained(checkpoint[0]).eval().to(DEVICE)
    prompts = [prompt(1, length, seed=length)[0].to(DEVICE) for length in (5, 11)]
    logits = {}
    with torch.no_grad(), backend.use_backend(kernels):
        for dtype in (None, torch.float8_e4m3fn):
            cache = KVCache(model.config, 2, 16, torch.device(DEVICE), dtype)
            logits[dtype] = [prefill(model, prompts, cache)]
            tokens = [torch.tensor([token, 7], device=DEVICE) for token in (3, 50, 9)]
            logits[dtype] += [decode_step(model, token, cache) for token in tokens]
    assert cache.keys.dtype == torch.float8_e4m3fn and cache.descales.shape == (2, 2, 2, 3)
    errors = [relative_error(fp8.cpu(), full.cpu()) for fp8, full in zip(logits[torch.float8_e4m3fn], logits[None])]
    assert errors[0] == 0 and all(1e-4 < error < 0.01 for error in errors[1:]), errors
    assert model.generate(prompts, 3, do_sample=False, kv_cache_dtype="fp8")[1].shape == (14,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_check.sh)")
def test_cuda_graph_decoding_matches_eager(checkpoint):
    model = GPT.from_pretrained(checkpoint[0]).eval().to("cuda")
    prompts = [prompt(1, length, seed=length)[0] for length in (5, 1, 17)]
    graphed = model.generate(prompts, 8, do_sample=False, cuda_graph=True)
    eager = model.generate(prompts, 8, do_sample=False, cuda_graph=False)
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager))


def test_generate_rejects_bad_prompts(checkpoint):
    model = GPT.from_pretrained(checkpoint[0]).eval()
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty"):
        model.generate([[1, 2], []], 2)
    with pytest.raises(ValueError, match=r"use_cache=False\) takes"):
        model.generate([[1, 2], [3]], 2, use_cache=False)
    with pytest.raises(ValueError, match=r"cuda_graph=True\) needs"):
        model.generate([[1, 2]], 2, cuda_graph=True)


def test_hf_attention_implementation_and_patch(checkpoint):
    folder, hf_model = checkpoint
    idx = prompt()
    expected = hf_model(idx).logits
    register()
    with torch.no_grad(), backend.use_backend("triton"):
        model = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="gptfast").eval()
        assert relative_error(model.to(DEVICE)(idx.to(DEVICE)).logits.cpu(), expected) < 1e-4
        patched = patch_hf(transformers.GPT2LMHeadModel.from_pretrained(folder).eval()).to(DEVICE)
        assert all(type(m) is not torch.nn.LayerNorm for m in patched.modules())
        assert any(isinstance(m, LayerNorm) for m in patched.modules())
        assert relative_error(patched(idx.to(DEVICE)).logits.cpu(), expected) < 1e-4
        on_device = idx.to(DEVICE)
        greedy = patched.generate(on_device, attention_mask=torch.ones_like(on_device), max_new_tokens=5,
                                  do_sample=False, pad_token_id=0).cpu()
    assert torch.equal(greedy, hf_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=5,
                                                 do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_model_config_and_gradients_flow(autocast):
    """A training step's gradients reach every parameter, also under bf16 autocast (as `gptfast train` runs on
    CUDA), where float32 residuals meet bf16 branch outputs in add_layer_norm."""
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False)
    model = GPT(config).to(DEVICE)
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = prompt(2, 10, vocab_size=50).to(DEVICE)
    with backend.use_backend("triton"), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(idx, torch.roll(idx, -1, dims=1))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                        for p in model.parameters())


def test_model_compiles_as_one_graph():
    """torch.compile(fullgraph=True) traces the whole forward and backward: no data-dependent check splits the
    graph (the token-id range check did, costing a synchronisation and a graph break per step)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32)
    model = GPT(config).to(DEVICE)
    idx = prompt(2, 10, vocab_size=50).to(DEVICE)
    targets = torch.roll(idx, -1, dims=1)
    with backend.use_backend("triton"):
        model.loss(idx, targets).backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        torch.compile(model.loss, fullgraph=True, backend="aot_eager")(idx, targets).backward()
    for p, grad in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m(torch.tensor([[0, 101]])), ValueError, r"token ids must be in \[0, 101\)"),
    (lambda m: m(torch.tensor([[-1, 3]])), ValueError, "token ids"),
    (lambda m: m(torch.zeros(1, 49, dtype=torch.long)), ValueError, "block size"),
    (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty"),
    (lambda m: m(torch.zeros(3, dtype=torch.long)), ValueError, "int64 tensor"),
    (lambda m: m(torch.zeros(1, 3, dtype=torch.int32)), ValueError, "int64"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[5, 101]])), ValueError,
     r"token ids and targets must be in \[0, 101\)"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[-100, 3]]) - 1), ValueError, "targets"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long)), ValueError,
     "targets must be an int64 tensor of idx's shape"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 4, top_p=0.0), ValueError, "top_p"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 4, top_p=1.5), ValueError, "top_p"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0), ValueError, "temperature"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 4, top_k=0), ValueError, "top_k"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), -1), ValueError, "max_new_tokens"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 2, kv_cache_dtype="int8"), ValueError,
     "kv_cache_dtype must be None, 'auto' or 'fp8'"),
    (lambda m: m.generate(torch.zeros(1, 3, dtype=torch.long), 2, use_cache=False, kv_cache_dtype="fp8"),
     ValueError, "needs use_cache=True"),
])
def test_bad_input_raises_clearly(checkpoint, call, error, match):
    model = GPT.from_pretrained(checkpoint[0])
    with pytest.raises(error, match=match):
        call(model)


def test_bad_checkpoints_raise_clearly(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(open(os.path.join(checkpoint[0], "config.json")).read())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(str(tmp_path))
    other = tmp_path / "other"
    make_hf_checkpoint(str(other), n_embd=48, n_head=2)
    os.replace(other / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="has shape"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        GPT.from_pretrained(str(tmp_path / "missing"))


def test_hub_name_offline_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hf download gpt2 --local-dir gpt2") as raised:
        GPT.from_pretrained("gpt2")
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no chained hub traceback
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        GPT.from_pretrained("runs/one/two")  # a mistyped local path, not a hub name: the hub is never asked
