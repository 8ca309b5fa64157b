"""What GPT.generate runs: the prefill of prompts of different lengths packed into one row, and the decode step on
the static KV cache, captured in a CUDA graph on CUDA (gpt-fast's way to a fast decode: one graph launch per
token instead of a few hundred kernel launches).

The prefill runs the prompts through flash_attn_varlen_func's kernels (no padding, no mask) and writes each
prompt's keys and values from position 0 of its cache row; every decode step then runs flash_attn_with_kvcache's
split-KV kernel with the per-sequence lengths, so a batch of prompts needs no padding mask at any step.
"""
import torch

from gptfast.packing import Packed


def prompts_of(idx):
    """(prompts, batched): a (B, T) tensor's rows, or a list of 1-dim int64 tensors or lists of ids, each
    non-empty, as a list of 1-dim int64 tensors; batched says whether idx was a tensor."""
    if isinstance(idx, torch.Tensor):
        if idx.dim() != 2 or idx.dtype != torch.int64 or idx.shape[1] == 0:
            raise ValueError(f"idx must be a (batch, seq_len) int64 tensor with seq_len >= 1, or a list of prompts, "
                             f"got {tuple(idx.shape)} {idx.dtype}")
        return list(idx), True
    if not isinstance(idx, (list, tuple)) or not idx:
        raise ValueError(f"idx must be a (batch, seq_len) int64 tensor or a non-empty list of prompts, got "
                         f"{type(idx).__name__}")
    prompts = [torch.as_tensor(p, dtype=torch.int64) if not isinstance(p, torch.Tensor) else p for p in idx]
    for i, p in enumerate(prompts):
        if p.dim() != 1 or p.dtype != torch.int64 or p.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-dim sequence of int64 ids, got {tuple(p.shape)} "
                             f"{p.dtype}")
    return prompts, False


def prefill(model, prompts, cache):
    """Runs the prompts packed into one row, fills their cache rows and sets cache.seqlens; returns the logits
    (B, vocab_size) of each prompt's last token."""
    device = cache.seqlens.device
    packed = Packed.from_lengths([len(p) for p in prompts], device)
    ids = torch.cat([p.to(device) for p in prompts])[None]
    model.check_ids(ids, packed=packed)
    hidden = model.hidden_states(ids, cache, packed)
    cache.seqlens.copy_(packed.lengths())
    return model.lm_head(hidden[0, packed.last_tokens()])


def decode_step(model, token, cache):
    """One token per sequence: token (B,) int64 -> logits (B, vocab_size); its keys and values are written at
    cache.seqlens, which then advance by 1."""
    hidden = model.hidden_states(token[:, None], cache)
    cache.seqlens.add_(1)
    return model.lm_head(hidden[:, -1])


class GraphedDecodeStep:
    """decode_step captured in a CUDA graph (torch.cuda.CUDAGraph): calling it copies the token into the graph's
    static input and replays; the logits it returns live in the graph's static output until the next call.

    The capture needs the kernels already compiled and tuned, so the step runs once first on a side stream (as
    torch's CUDA-graph notes prescribe). That run writes a token's keys at cache.seqlens, a slot no step reads
    before the first real step overwrites it, at a position the model has (generate captures only when a step
    will run); cache.seqlens is then restored."""

    def __init__(self, model, cache, batch):
        self.token = torch.zeros(batch, dtype=torch.int64, device=cache.seqlens.device)
        seqlens = cache.seqlens.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            decode_step(model, self.token, cache)
        torch.cuda.current_stream().wait_stream(stream)
        cache.seqlens.copy_(seqlens)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_step(model, self.token, cache)

    def __call__(self, token):
        self.token.copy_(token)
        self.graph.replay()
        return self.logits
