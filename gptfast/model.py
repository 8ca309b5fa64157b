"""A GPT-2 model on gptfast's kernels: modules in the order data flows through them, and generation with a KV
cache. Structured after nanoGPT's model.py; its configuration is gptfast.config's, Hugging Face's GPT-2 format
(weight names and layouts, config.json, checkpoint folders) gptfast.checkpoint's.

Shapes: token ids (B, T) int64; hidden states (B, T, C) with C = n_embd; per-head tensors (B, T, H, D), the layout
of the fused QKV projection, which reaches the attention kernel as strided views with no copy.
"""
import math
import warnings

import torch
import torch.nn as nn

from gptfast import checkpoint
from gptfast.attention import flash_attn_func
from gptfast.config import GPTConfig
from gptfast.decoder import GraphedDecodeStep, decode_step, prefill, prompts_of
from gptfast.fp8 import FP8, FP8_MAX, to_fp8
from gptfast.kvcache import cached_attention
from gptfast.layernorm import LayerNorm, add_layer_norm
from gptfast.loss import linear_cross_entropy
from gptfast.packing import Packed
from gptfast.varlen import varlen_attention

__all__ = ["GPT", "GPTConfig", "KVCache"]  # GPTConfig lives in gptfast.config; importable from here as before


class KVCache:
    """The static cache of one generate call, in flash_attn_with_kvcache's layout: keys and values (n_layer, B,
    max_len, H, D), allocated once, at the prefill, in the dtype the keys come in (so it also serves under
    autocast) or in float8 e4m3 (dtype torch.float8_e4m3fn: half the bytes a decode step reads); seqlens int32
    (B,), the tokens each sequence holds (prompts of different lengths differ); block_table int32 (B, 1), each
    sequence's cache row. A decode step writes its token's keys at seqlens and then adds 1 in place, so a CUDA
    graph of the step replays with no input but the token.

    A float8 cache keeps, per layer, the kernel's descales (n_layer, 2, B, H) float32: per head, the largest
    magnitude of the prompts' keys (then values) over FP8_HEADROOM * 448, so later tokens up to FP8_HEADROOM times
    larger are stored unclipped (larger ones saturate)."""
    FP8_HEADROOM = 4.0  # costs no relative precision but in values under 1/7000 of the top (float8's subnormals)

    def __init__(self, config, batch, max_len, device, dtype=None):
        self.shape = (config.n_layer, batch, max_len, config.n_head, config.n_embd // config.n_head)
        self.dtype = dtype
        self.keys = self.values = self.descales = None
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.block_table = torch.arange(batch, dtype=torch.int32, device=device)[:, None]

    def write_prompts(self, layer, k, v, packed):
        """k, v: (total, H, D) of the prompts packed as `packed` (gptfast.packing.Packed), written from position
        0 of each sequence's row (in float8, scaled by this layer's new descales, for a float8 cache)."""
        if self.keys is None:
            self.keys, self.values = (k.new_zeros(self.shape, dtype=self.dtype) for _ in range(2))
            if self.dtype == FP8:
                self.descales = torch.ones((self.shape[0], 2, self.shape[1], self.shape[3]), device=k.device)
        if self.dtype == FP8:
            amax = torch.stack([torch.linalg.vector_norm(t, float("inf"), dim=(0, 2)) for t in (k, v)]).float()
            self.descales[layer] = torch.where(amax > 0, amax * (self.FP8_HEADROOM / FP8_MAX), 1.0)[:, None]
            k, v = (to_fp8(t, 1 / scale[0][:, None]) for t, scale in zip((k, v), self.descales[layer]))
        self.keys[layer][packed.sequence, packed.positions] = k
        self.values[layer][packed.sequence, packed.positions] = v

    def descale(self, layer):
        """The decoding kernel's descale of a layer: (2, B, H) float32, or None for a cache in the model's dtype."""
        return None if self.descales is None else self.descales[layer]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.dropout  # on the attention weights, inside the kernel
        self.context_parallel = None  # a gptfast.distributed.context.ContextParallel: GPT.use_context_parallel

    def forward(self, x, cache=None, packed=None):
        """x (B, T, C). packed: x is (1, total, C), sequences packed as described (training on packed documents,
        or a prefill of prompts, which also fills the cache). cache without packed: a decode step, T new tokens
        per sequence after cache.seqlens."""
        batch, seqlen, width = x.shape
        q, k, v = self.c_attn(x).view(batch, seqlen, 3, self.n_head, width // self.n_head).unbind(dim=2)
        dropout_p = self.attn_dropout if self.training else 0.0
        if packed is not None:
            if cache is not None:
                cache.write_prompts(self.layer, k[0], v[0], packed)
            cu_seqlens, longest = packed.cu_seqlens, packed.max_seqlen
            y = varlen_attention(q[0], k[0], v[0], cu_seqlens, cu_seqlens, longest, longest, dropout_p,
                                 causal=True)[None]
        elif cache is not None:  # writes k, v at cache.seqlens, attends to everything up to them (bottom-right)
            y = cached_attention(q, cache.keys[self.layer], cache.values[self.layer], k, v, cache.seqlens,
                                 cache.block_table, causal=True, descale=cache.descale(self.layer))[0]
        elif self.context_parallel is not None:  # x holds this rank's tokens of sequences sharded over a group
            y = self.context_parallel.causal_attention(q, k, v)
        else:
            y = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        return self.resid_dropout(self.c_proj(y.reshape(batch, seqlen, width)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A pre-LN block that takes and returns the residual stream apart from the branch output, so that each
    residual add runs fused with the LayerNorm after it (flash-attn's prenorm Block passes residuals this way).
    forward(hidden, residual) -> (branch output, residual stream so far); the caller adds the last pair."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, hidden, residual, cache=None, packed=None):
        normed, residual = _add_norm(hidden, residual, self.ln_1)
        hidden = self.attn(normed, cache, packed)
        normed, residual = _add_norm(hidden, residual, self.ln_2)
        return self.mlp(normed), residual


def _add_norm(hidden, residual, norm):
    """(norm(hidden + residual), hidden + residual); the first block has no residual yet."""
    if residual is None:
        return norm(hidden), hidden
    return add_layer_norm(hidden, residual, norm.weight, norm.bias, norm.eps)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.context_parallel = None  # see use_context_parallel
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream: 1/sqrt(2 * n_layer) keeps its variance.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def use_context_parallel(self, context_parallel):
        """Takes sequences sharded over a group's ranks from now on (training): context_parallel, a
        gptfast.distributed.context.ContextParallel, gives each token's position in the whole sequence and runs
        the attention across the group; None: whole sequences again. The attention's dropout is not applied."""
        self.context_parallel = context_parallel
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                module.context_parallel = context_parallel

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward and backward) per token at sequence length seq_len: 6 per parameter plus the
        attention scores and weighted sum, 12 * layers * width * seq_len (PaLM's appendix B count, as nanoGPT's
        estimate_mfu). The place MFU and the benchmarks' TFLOP/s both count from."""
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def forward(self, idx, targets=None, packed=None):
        """idx: (B, T) int64 token ids -> logits (B, T, vocab_size) in the model's dtype; with targets (B, T) int64
        (targets[b, t] the token after idx[b, t]) the mean next-token loss instead, float32, computed by the fused
        linear cross-entropy so that the logits are never held (on PyTorch under the torch backend).

        packed: a gptfast.packing.Packed of documents packed into idx (1, total): each attends only within
        itself and its positions restart at 0, so the loss equals that of the documents run one by one."""
        self.check_ids(idx, targets, packed)
        hidden = self.hidden_states(idx, packed=packed)
        if targets is None:
            return self.lm_head(hidden)
        return linear_cross_entropy(hidden, self.lm_head.weight, targets, check_classes=False)  # checked above

    def loss(self, idx, targets, packed=None):
        """Mean next-token cross-entropy: idx and targets (B, T) int64, as forward(idx, targets, packed)."""
        return self(idx, targets, packed)

    def hidden_states(self, idx, cache=None, packed=None):
        """The final LayerNorm's output (B, T, C) for checked ids. With packed, idx (1, total) holds packed
        sequences (their prompts, with a cache, which they fill); with a cache alone, a decode step: idx (B, T)
        holds the tokens after each sequence's cache.seqlens (the caller advances them)."""
        if packed is not None:
            positions = packed.positions
        elif cache is not None:
            positions = cache.seqlens[:, None].long() + torch.arange(idx.shape[1], device=idx.device)
        elif self.context_parallel is not None:
            positions = self.context_parallel.positions(idx.shape[1], idx.device)
        else:
            positions = torch.arange(idx.shape[1], device=idx.device)
        hidden = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        residual = None
        for block in self.transformer.h:
            hidden, residual = block(hidden, residual, cache, packed)
        ln_f = self.transformer.ln_f
        return _add_norm(hidden, residual, ln_f)[0]

    def check_ids(self, idx, targets=None, packed=None):
        """idx (and targets, where given: the same shape, ids or -100 to ignore; and packed, where given) as the
        model can take them."""
        if packed is not None:
            if not isinstance(packed, Packed) or getattr(idx, "shape", None) != (1, packed.total):
                raise ValueError(f"packed must be a gptfast.packing.Packed whose lengths sum to idx's (1, total) "
                                 f"shape, got {type(packed).__name__} for idx of shape "
                                 f"{tuple(getattr(idx, 'shape', ()))}")
            if packed.max_seqlen > self.config.block_size:
                raise ValueError(f"a packed sequence of {packed.max_seqlen} tokens is longer than the model's "
                                 f"block size ({self.config.block_size})")
        if targets is not None and (not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64
                                    or targets.shape != getattr(idx, "shape", None)):
            raise ValueError(f"targets must be an int64 tensor of idx's shape, got "
                             f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64:
            raise ValueError(f"idx must be a (batch, seq_len) int64 tensor, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}"
                             f"{' ' + str(idx.dtype) if isinstance(idx, torch.Tensor) else ''}")
        if idx.shape[1] == 0:
            raise ValueError("idx is empty: give at least one token")
        if idx.shape[1] > self.config.block_size and packed is None:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than the model's block size "
                             f"({self.config.block_size})")
        # An id out of range would be a device-side assert on CUDA, which ends the process's CUDA context: check
        # the ids and the targets here, with one synchronisation for both. Under torch.compile that data-dependent
        # branch would split the graph in two, so compiled models skip it (as torch's own embedding does).
        if idx.numel() and not torch.compiler.is_compiling():
            ids = idx if targets is None else torch.stack((idx, targets.masked_fill(targets == -100, 0)))
            low, high = torch.stack(torch.aminmax(ids)).tolist()
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"token ids{' and targets' if targets is not None else ''} must be in "
                                 f"[0, {self.config.vocab_size}), got values in [{low}, {high}]")

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                 eos_token_id=None, use_cache=True, generator=None, on_token=None, cuda_graph=None,
                 kv_cache_dtype=None):
        """Continue each prompt by up to max_new_tokens tokens.

        Args:
            idx: (B, T) int64 prompts of equal length, or a list of prompts of any lengths (1-dim int64 tensors or
                lists of ids), 1 <= T <= block_size. Prompts of different lengths need no padding: the prefill
                packs them (flash_attn_varlen_func) and each keeps its own cache length.
            do_sample: sample from the (temperature, top_k, top_p filtered) distribution; False is greedy, token
                for token what transformers' generate(do_sample=False) returns.
            eos_token_id: a sequence that emits it is finished and padded with it; all finished stops generation.
            use_cache: keep keys and values in a static KVCache and run one token per step through
                flash_attn_with_kvcache; False recomputes every step from the start (equal-length prompts only).
            generator: a torch.Generator for reproducible sampling.
            on_token: called with each new (B,) token tensor, for streaming.
            cuda_graph: run the decode step as a captured CUDA graph (default: on CUDA, with the cache).
            kv_cache_dtype: None or "auto" (the model's), or "fp8" (torch.float8_e4m3fn, per-head scales from the
                prompts: KVCache): half the cache's memory and of what each decode step reads, for a small error.
        Returns:
            (B, T + n) int64 for a tensor idx, else a list of 1-dim tensors (prompt and its n new tokens), n <=
            max_new_tokens. Stops early, with a warning, at the block size.
        """
        prompts, batched = prompts_of(idx)
        _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        cache_dtype = _cache_dtype(kv_cache_dtype, use_cache)
        if not use_cache and not batched:
            raise ValueError("generate(use_cache=False) takes a (batch, seq_len) tensor of equal-length prompts")
        longest = max(len(p) for p in prompts)
        if longest > self.config.block_size:
            raise ValueError(f"a prompt of {longest} tokens is longer than the model's block size "
                             f"({self.config.block_size})")
        if max_new_tokens > self.config.block_size - longest:
            warnings.warn(f"generate: the model's block size is {self.config.block_size} tokens, so it stops after "
                          f"{self.config.block_size - longest} new tokens instead of {max_new_tokens}", stacklevel=2)
            max_new_tokens = self.config.block_size - longest
        device = self.lm_head.weight.device
        if use_cache:
            step, logits = self._cached_decoder(prompts, max_new_tokens, device, cuda_graph, cache_dtype)
        else:
            step, logits = self._uncached_decoder(idx)
        new = self._decode(step, logits, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                           generator, on_token)
        if batched:
            return torch.cat([idx, new], dim=1)
        return [torch.cat([p.to(device), row]) for p, row in zip(prompts, new)]

    def _cached_decoder(self, prompts, max_new_tokens, device, cuda_graph, cache_dtype):
        """(step, first logits): the prefill done, a function of the last tokens (B,) returning the next logits."""
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"generate(cuda_graph=True) needs the model on a CUDA device, not {device}")
        cache = KVCache(self.config, len(prompts), max(len(p) for p in prompts) + max_new_tokens, device,
                        cache_dtype)
        logits = prefill(self, prompts, cache)
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and max_new_tokens > 1:  # the first new token comes from the prefill: no step runs for it
            return GraphedDecodeStep(self, cache, len(prompts)), logits
        return (lambda token: decode_step(self, token, cache)), logits

    def _uncached_decoder(self, idx):
        """(step, first logits) recomputing every position each step: the reference the cached path must equal."""
        self.check_ids(idx)
        tokens = [idx]

        def step(token):
            tokens.append(token[:, None])
            return self.lm_head(self.hidden_states(torch.cat(tokens, 1))[:, -1])
        return step, self.lm_head(self.hidden_states(idx)[:, -1])

    def _decode(self, step, logits, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                generator, on_token):
        """The sampling loop: (B, n) int64 new tokens, n <= max_new_tokens (fewer when every sequence ended)."""
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        new = []
        for i in range(max_new_tokens):
            token = _next_token(logits.float(), do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            new.append(token[:, None])
            if on_token is not None:
                on_token(token)
            if (eos_token_id is not None and finished.all()) or i == max_new_tokens - 1:
                break
            logits = step(token)
        return torch.cat(new, dim=1) if new else logits.new_zeros((logits.shape[0], 0), dtype=torch.int64)

    # ------------------------------------------------------------------------------------------------------------
    # Weights

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None):
        """A GPT-2 checkpoint in Hugging Face's format: a local folder (config.json and model.safetensors or
        pytorch_model.bin) or a hub name (gpt2, gpt2-medium, ...) from the Hugging Face cache or the hub."""
        folder = checkpoint.resolve(name_or_path)
        model = cls(checkpoint.read_config(folder))
        checkpoint.load_state(model, folder)
        return model.to(device=device, dtype=dtype)

    def load_hf_state_dict(self, hf_state):
        """Copy a transformers GPT2LMHeadModel state_dict in (the mapping is gptfast.checkpoint's)."""
        checkpoint.load_hf_state_dict(self, hf_state)

    def hf_state_dict(self, state_dict=None):
        """This model's weights (or a state_dict of it) under transformers GPT2LMHeadModel's names and layouts."""
        return checkpoint.hf_state_dict(self.state_dict() if state_dict is None else state_dict)

    def save_pretrained(self, folder):
        """Writes config.json and model.safetensors in Hugging Face's GPT-2 format, atomically per file."""
        checkpoint.save(self, folder)


def _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _cache_dtype(kv_cache_dtype, use_cache):
    """generate's kv_cache_dtype as KVCache's dtype: None (the model's) or torch.float8_e4m3fn."""
    if kv_cache_dtype in (None, "auto"):
        return None
    if kv_cache_dtype not in ("fp8", FP8):
        raise ValueError(f"kv_cache_dtype must be None, 'auto' or 'fp8', got {kv_cache_dtype!r}")
    if not use_cache:
        raise ValueError("kv_cache_dtype='fp8' needs use_cache=True")
    return FP8


def _next_token(logits, do_sample, temperature, top_k, top_p, generator):
    """logits (B, vocab) float32 -> (B,) int64."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling: keep the most likely tokens whose probabilities sum to top_p (at least one).
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
