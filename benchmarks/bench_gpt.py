"""End to end: a GPT-2 124M training step and text generation with the KV cache, on gptfast's kernels against
the same model on plain PyTorch (--kernels torch), each training step also under torch.compile, and generation
also against transformers' GPT-2 on SDPA.

tokens_per_s counts the tokens a step trains on (batch x block), or the new tokens generated (batch x new).
tflops counts a training step as GPT.flops_per_token (6 * parameters + 12 * layers * width * block per token, PaLM's
appendix B count, as nanoGPT's MFU and `gptfast train`'s), at bf16 autocast.
"""
import pytest
import torch

from gptfast import GPT, GPTConfig, use_backend
from harness import DEVICE, FULL, GPTFAST_BACKEND, measure

if FULL:
    CONFIG = GPTConfig()  # GPT-2 124M
    TRAIN_BATCH, PROMPT, NEW_TOKENS = 8, 32, 64
else:
    CONFIG = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)
    TRAIN_BATCH, PROMPT, NEW_TOKENS = 4, 8, 16
KERNELS = {"gptfast": GPTFAST_BACKEND, "torch": "torch"}


def _model():
    torch.manual_seed(0)
    return GPT(CONFIG).to(DEVICE)


def _training_step(kernels, compiled, benchmark):
    if compiled and DEVICE != "cuda":
        pytest.skip("torch.compile builds C++ for minutes on a CPU; compiled steps run on CUDA only")
    model = _model()
    run = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
    tokens = torch.randint(0, CONFIG.vocab_size, (TRAIN_BATCH, CONFIG.block_size + 1), device=DEVICE)
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda")

    def step():
        with use_backend(KERNELS[kernels]), autocast:
            loss = run(tokens[:, :-1], tokens[:, 1:])  # the fused linear cross-entropy on gptfast's kernels
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    trained = TRAIN_BATCH * CONFIG.block_size
    flops = model.flops_per_token(CONFIG.block_size) * trained
    name = kernels + ("+compile" if compiled else "")
    measure(benchmark, step, cpu_twin="torch", group="gpt2 training step", impl=name, flops=flops, op="train_step",
            tokens=trained)


@pytest.mark.parametrize("kernels", list(KERNELS))
def test_training_step(benchmark, kernels):
    _training_step(kernels, False, benchmark)


@pytest.mark.compiled
@pytest.mark.parametrize("kernels", list(KERNELS))
def test_training_step_compiled(benchmark, kernels):
    _training_step(kernels, True, benchmark)


def _transformers_model():
    """transformers' GPT-2 of the same shape and weights, on its SDPA attention."""
    import transformers
    config = transformers.GPT2Config(vocab_size=CONFIG.vocab_size, n_positions=CONFIG.block_size,
                                     n_embd=CONFIG.n_embd, n_layer=CONFIG.n_layer, n_head=CONFIG.n_head)
    config._attn_implementation = "sdpa"
    hf = transformers.GPT2LMHeadModel(config)
    hf.load_state_dict(_model().hf_state_dict(), strict=False)  # lm_head.weight is tied to wte
    return hf


GENERATORS = ["gptfast", "gptfast-no-graph", "torch", "transformers-sdpa"]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("impl", GENERATORS)
def test_generation(benchmark, impl, batch):
    """Greedy decoding of NEW_TOKENS after a PROMPT-token prompt: gptfast's static cache and split-KV kernel with
    the decode step in a CUDA graph (on CUDA), the same without the graph, the model on PyTorch, and
    transformers' own generate on SDPA."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = (_transformers_model() if impl == "transformers-sdpa" else _model()).to(DEVICE, dtype).eval()
    prompt = torch.randint(0, CONFIG.vocab_size, (batch, PROMPT), device=DEVICE)

    def generate():
        if impl == "transformers-sdpa":
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        with use_backend("torch" if impl == "torch" else GPTFAST_BACKEND):
            graph = DEVICE == "cuda" and impl == "gptfast"
            return model.generate(prompt, NEW_TOKENS, do_sample=False, cuda_graph=graph)

    measure(benchmark, generate, cpu_twin="torch", group=f"gpt2 generation batch={batch}", impl=impl,
            op="generate", batch=batch, tokens=batch * NEW_TOKENS)
