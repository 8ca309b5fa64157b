"""Programmable attention: FlexAttention's API (torch.nn.attention.flex_attention) on gptfast's kernels, without
torch.compile. A mod is a @triton.jit function that the attention kernels inline on each tile:

    score_mod(score, batch, head, q_idx, kv_idx, args) -> the new score     (score: q . k * scale, float32)
    mask_mod(batch, head, q_idx, kv_idx, args) -> whether each pair is visible

q_idx and kv_idx are int32 index tiles that broadcast against the score tile, clamped into the sequences (a mod
may index a tensor by position anywhere); args is the mod's own tuple of tensors and numbers, passed beside it
(Mod). Only the functions are compile-time constants: lengths, the batch, args' contents and a block mask's lists
are runtime values. Built-in mods, with their PyTorch twins, are in gptfast.flex_mods.

A BlockMask (create_block_mask) records which (query block, key block) pairs of the score matrix the mask mod
leaves empty, partial or full: the kernels never load empty blocks and skip the mask mod on full ones.
"""
import inspect
from typing import Callable, NamedTuple

import torch

from gptfast import backend
from gptfast.attention_core import check_inputs, kernel_gap, softmax_scale_for, work_dtype
from gptfast.kernels.block_mask import EMPTY, FULL, PARTIAL


class Mod(NamedTuple):
    """One @triton.jit mod with its args tuple and, for the PyTorch path, its twin reference: a function of
    (score,) batch, head, q_idx, kv_idx (int64 index tensors that broadcast against each other) and then *args."""
    fn: Callable
    args: tuple = ()
    reference: Callable | None = None


class MaskMod(NamedTuple):
    """A mask mod in disjunctive form: a pair is visible where, for some term, each of its Mods says True (one
    term of one Mod for a plain mod; and_masks and or_masks combine)."""
    terms: tuple

    @classmethod
    def of(cls, fn, args=(), reference=None):
        """The mask mod of one @triton.jit function."""
        return cls(((Mod(fn, tuple(args), reference),),))


class ScoreMod(NamedTuple):
    """A score mod: the Mod, its derivative grad (grad, score, batch, head, q_idx, kv_idx, args) -> the gradient
    reaching score (None: forward only), and arg_grad (grad, score, batch, head, q_idx, kv_idx, args, grads),
    None or a function adding the gradient of the tensors in args into grads (float32 buffers like them)."""
    mod: Mod
    grad: Callable | None = None
    arg_grad: Callable | None = None


def and_masks(*masks):
    """A mask mod visible where every one of masks is (FlexAttention's and_masks)."""
    terms = ((),)
    for mask in map(as_mask_mod, masks):
        terms = tuple(left + right for left in terms for right in mask.terms)
    return MaskMod(terms)


def or_masks(*masks):
    """A mask mod visible where any of masks is (FlexAttention's or_masks)."""
    return MaskMod(tuple(term for mask in map(as_mask_mod, masks) for term in mask.terms))


noop_mask = MaskMod(((),))  # every pair visible: one term with nothing to satisfy


def as_mask_mod(mask):
    """A MaskMod, or a bare @triton.jit mask mod taking no args."""
    if isinstance(mask, MaskMod):
        return mask
    if _is_jit(mask):
        return MaskMod.of(mask)
    raise TypeError(f"mask_mod must be a gptfast.flex.MaskMod or a @triton.jit function (batch, head, q_idx, "
                    f"kv_idx, args), got {type(mask).__name__}")


def as_score_mod(score_mod):
    """A ScoreMod, or None; a bare @triton.jit score mod takes no args and has no derivative."""
    if score_mod is None or isinstance(score_mod, ScoreMod):
        return score_mod
    if _is_jit(score_mod):
        return ScoreMod(Mod(score_mod))
    raise TypeError(f"score_mod must be None, a gptfast.flex.ScoreMod or a @triton.jit function (score, batch, "
                    f"head, q_idx, kv_idx, args), got {type(score_mod).__name__}")


def _is_jit(fn):
    """Whether fn is a @triton.jit function (an InterpretedFunction under TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return isinstance(fn, (JITFunction, InterpretedFunction))


def _name(fn):
    return fn.fn.__name__


ARITY = {"mask_mod": ("batch", "head", "q_idx", "kv_idx", "args"),
         "score_mod": ("score", "batch", "head", "q_idx", "kv_idx", "args"),
         "grad": ("grad", "score", "batch", "head", "q_idx", "kv_idx", "args"),
         "arg_grad": ("grad", "score", "batch", "head", "q_idx", "kv_idx", "args", "grads")}


def _check_arity(fn, kind):
    """A mod must take exactly the parameters the kernels pass (ARITY): a clear error instead of Triton's."""
    expected, names = ARITY[kind], list(inspect.signature(fn.fn).parameters)
    if len(names) != len(expected):
        raise TypeError(f"{kind} {_name(fn)} takes {len(names)} parameters ({', '.join(names)}); a {kind} takes "
                        f"{len(expected)}: ({', '.join(expected)})")


def _check_mods(score_mod, mask_mod, device):
    """Every function of a call's mods takes the parameters the kernels pass; every tensor they read is on
    device (a kernel reading another device's memory would crash, not raise)."""
    mods = [(mod, "mask_mod") for term in mask_mod.terms for mod in term]
    if score_mod is not None:
        mods.append((score_mod.mod, "score_mod"))
        for kind in ("grad", "arg_grad"):
            if getattr(score_mod, kind) is not None:
                _check_arity(getattr(score_mod, kind), kind)
    for mod, kind in mods:
        _check_arity(mod.fn, kind)
        for arg in mod.args:
            if isinstance(arg, torch.Tensor) and arg.device != device:
                raise ValueError(f"{kind} {_name(mod.fn)} reads a tensor on {arg.device}, but the call runs on "
                                 f"{device}: move its args there")


class BlockMask(NamedTuple):
    """Which blocks of the (Tq, Tk) score matrix a mask mod leaves EMPTY, PARTIAL or FULL (block_mask's): states,
    uint8 (B, H, cdiv(Tq, block_q), cdiv(Tk, block_kv)), B and H possibly 1 (shared by every batch or head);
    block_size (block_q, block_kv); seq_lengths (Tq, Tk); and the mask mod itself, which the kernels evaluate on
    partial blocks. A block is FULL only if it lies inside both sequences and every pair is visible."""
    states: torch.Tensor
    block_size: tuple
    seq_lengths: tuple
    mask_mod: MaskMod

    def sparsity(self):
        """The percentage of blocks never visited (FlexAttention's BlockMask.sparsity)."""
        return 100.0 * (self.states == EMPTY.value).float().mean().item()

    def coarsened(self, smallest):
        """The same mask with blocks of at least `smallest` rows and keys (the kernels' largest tile): a coarse
        block is EMPTY or FULL only if all of its blocks are (blocks past the ends count as EMPTY)."""
        factors = [max(1, smallest // size) for size in self.block_size]
        if factors == [1, 1]:
            return self
        batch, heads, rows, columns = self.states.shape
        pad = (0, -columns % factors[1], 0, -rows % factors[0])
        states = torch.nn.functional.pad(self.states, pad).view(
            batch, heads, -1, factors[0], (columns + pad[1]) // factors[1], factors[1])
        low, high = states.amin(dim=(3, 5)), states.amax(dim=(3, 5))
        coarse = torch.where(low == high, low, PARTIAL.value).to(torch.uint8)
        return self._replace(states=coarse, block_size=tuple(s * f for s, f in zip(self.block_size, factors)))


def lists_of(states):
    """(num, indices, full_num, full_indices) of block states (B, H, R, C): per row, how many PARTIAL and FULL
    blocks it has and their column indices first (int32, contiguous), as attention_spec.Flex takes them."""
    lists = []
    for state in (PARTIAL.value, FULL.value):
        flags = states == state
        lists += [flags.sum(-1, dtype=torch.int32),
                  torch.argsort(flags.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)]
    return tuple(t.contiguous() for t in lists)


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cuda", BLOCK_SIZE=128):
    """The BlockMask of mask_mod (a MaskMod, or a bare @triton.jit mask mod) for B batches and H heads (None: 1,
    shared by all) of Q_LEN queries and KV_LEN keys, with blocks of BLOCK_SIZE (an int, or (rows, keys); powers
    of two from 16). The mods' tensors must be on device. Runs one kernel over the blocks; PyTorch (the mods'
    reference twins, densely) where the kernels cannot run."""
    mask_mod = as_mask_mod(mask_mod)
    device = torch.device(device)
    _check_mods(None, mask_mod, device)
    block_size = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    if not all(isinstance(size, int) and size >= 16 and size & (size - 1) == 0 for size in block_size):
        raise ValueError(f"BLOCK_SIZE must be a power of two from 16, or a pair of them, got {BLOCK_SIZE!r}")
    for name, value in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not (value is None and name in "BH" or isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be a positive int{' or None' if name in 'BH' else ''}, got {value!r}")
    shape = (B or 1, H or 1, Q_LEN, KV_LEN)
    if backend.use_triton("create_block_mask", device):
        from gptfast.kernels.block_mask import block_states
        states = block_states(_mod_functions(mask_mod), _mod_args(mask_mod), *shape, block_size, device)
    else:
        states = _reference_states(mask_mod, shape, block_size, device)
    return BlockMask(states, block_size, (Q_LEN, KV_LEN), mask_mod)


def _mod_functions(mask_mod):
    return tuple(tuple(mod.fn for mod in term) for term in mask_mod.terms)


def _mod_args(mask_mod):
    return tuple(tuple(mod.args for mod in term) for term in mask_mod.terms)


def _reference_states(mask_mod, shape, block_size, device):
    """Block states from the dense reference mask, for devices the kernels cannot run on."""
    batch, heads, seqlen_q, seqlen_k = shape
    rows, columns = -(-seqlen_q // block_size[0]), -(-seqlen_k // block_size[1])
    visible = reference_mask(mask_mod, batch, heads, seqlen_q, seqlen_k, device)
    padded = torch.zeros((batch, heads, rows * block_size[0], columns * block_size[1]), dtype=torch.int32,
                         device=device)
    padded[:, :, :seqlen_q, :seqlen_k] = visible.expand(batch, heads, seqlen_q, seqlen_k)
    counts = padded.view(batch, heads, rows, block_size[0], columns, block_size[1]).sum(dim=(3, 5))
    full = counts == block_size[0] * block_size[1]
    return torch.where(full, FULL.value, torch.where(counts > 0, PARTIAL.value, EMPTY.value)).to(torch.uint8)


def _indices(batch, heads, seqlen_q, seqlen_k, device):
    """(batch, head, q_idx, kv_idx) int64 index tensors that broadcast to (B, H, Tq, Tk)."""
    return tuple(torch.arange(n, device=device).view([n if i == axis else 1 for i in range(4)])
                 for axis, n in enumerate((batch, heads, seqlen_q, seqlen_k)))


def _reference(mod, role):
    if mod.reference is None:
        raise NotImplementedError(f"{role} {_name(mod.fn)} has no PyTorch reference, so it runs only on "
                                  f"gptfast's kernels (a CUDA device, or TRITON_INTERPRET=1 on the CPU); give "
                                  f"Mod(fn, args, reference) one to run anywhere")
    return mod.reference


def reference_mask(mask_mod, batch, heads, seqlen_q, seqlen_k, device):
    """The mask mod evaluated densely with its PyTorch twins: bool, broadcastable to (B, H, Tq, Tk)."""
    indices = _indices(batch, heads, seqlen_q, seqlen_k, device)
    visible = torch.zeros((1, 1, 1, 1), dtype=torch.bool, device=device)
    for term in mask_mod.terms:
        seen = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
        for mod in term:
            seen = seen & _reference(mod, "mask_mod")(*indices, *mod.args)
        visible = visible | seen
    return visible


def reference_flex(query, key, value, score_mod, mask_mod, scale):
    """flex_attention in PyTorch on (B, H, T, D) inputs, from the mods' reference twins: (out, lse), lse -inf and
    out 0 for a row that sees no key (FlexAttention's convention). Computes in float32 (float64 for float64)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    work = work_dtype(query.dtype)
    scores = (query.to(work) @ key.to(work).transpose(-1, -2)) * scale
    shape = (*query.shape[:2], query.shape[2], key.shape[2])
    if score_mod is not None:
        scores = _reference(score_mod.mod, "score_mod")(scores, *_indices(*shape, query.device),
                                                        *score_mod.mod.args).to(work)
    scores = scores.masked_fill(~reference_mask(mask_mod, *shape, query.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return (probs @ value.to(work)).to(query.dtype), lse.float()


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False):
    """FlexAttention's flex_attention on gptfast's kernels, forward and backward. query (B, Hq, Tq, D), key
    (B, Hkv, Tk, D) and value (B, Hkv, Tk, Dv) (Hkv = Hq, or a divisor of it with enable_gqa), one floating dtype.
    score_mod: None, a ScoreMod or a bare @triton.jit score mod; block_mask: None (every pair visible) or a
    BlockMask for (Tq, Tk) whose batch and head counts are 1 or the inputs'. scale: of q . k, 1 / sqrt(D) by
    default. Returns out (B, Hq, Tq, Dv), and with return_lse also lse (B, Hq, Tq) float32 (natural log; -inf for
    a row that sees no key). Gradients reach q, k, v and the score mod's tensor args that require them (through
    its arg_grad)."""
    check_inputs(query, key, value, enable_gqa)
    if query.dim() != 4:
        raise ValueError(f"query, key and value must be 4-dim (B, H, T, D), got {query.dim()} dims")
    score_mod = as_score_mod(score_mod)
    gap = kernel_gap(query, value, softmax_scale_for(query.shape[-1], scale), flex=True)
    if gap is None and query.dtype == torch.float32 and _is_torch_block_mask(block_mask):
        gap = ("float32 inputs with a torch BlockMask (reading its bits spills float32 tiles; "
               "gptfast.flex.create_block_mask's masks run)")
    block_mask = _checked_block_mask(block_mask, query, key)
    _check_mods(score_mod, block_mask.mask_mod if block_mask else noop_mask, query.device)
    scale = softmax_scale_for(query.shape[-1], scale)
    if backend.use_triton("flex_attention", query.device, gap):
        tensors = [arg for arg in score_mod.mod.args if isinstance(arg, torch.Tensor)] if score_mod else []
        out, lse = _FlexAttention.apply(query, key, value, score_mod, block_mask, scale, *tensors)
        lse = lse.masked_fill(lse == float("inf"), float("-inf"))  # the kernels' empty rows
    else:
        out, lse = reference_flex(query, key, value, score_mod, block_mask.mask_mod if block_mask else noop_mask,
                                  scale)
    return (out, lse) if return_lse else out


def _checked_block_mask(block_mask, query, key):
    """The call's BlockMask (None: every pair visible; a torch BlockMask converted), checked against the
    inputs."""
    seq_lengths = (query.shape[2], key.shape[2])
    if block_mask is None:
        return None
    if _is_torch_block_mask(block_mask):
        from gptfast.kernels import device_arch
        from gptfast.kernels.attention_tuning import largest_tile
        block_mask = from_torch_block_mask(block_mask, largest_tile(device_arch(query.device), query.dtype))
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be None, a gptfast.flex.BlockMask (create_block_mask) or torch's "
                        f"BlockMask, got {type(block_mask).__name__}")
    if tuple(block_mask.seq_lengths) != seq_lengths:
        raise ValueError(f"block_mask was made for (Q_LEN, KV_LEN) = {tuple(block_mask.seq_lengths)}, but the "
                         f"inputs have {seq_lengths}")
    batch, heads = block_mask.states.shape[:2]
    if batch not in (1, query.shape[0]) or heads not in (1, query.shape[1]):
        raise ValueError(f"block_mask has (B, H) = ({batch}, {heads}); the inputs need 1 or ({query.shape[0]}, "
                         f"{query.shape[1]}) each")
    if block_mask.states.device != query.device:
        raise ValueError(f"block_mask is on {block_mask.states.device} but query is on {query.device}")
    return block_mask


def kernel_flex(score_mod, block_mask, device, dtype):
    """The attention_spec.Flex of a call: its mods, and the block mask's lists with blocks at least as large as
    the kernels' largest tile on device for inputs of dtype."""
    from gptfast.kernels import device_arch
    from gptfast.kernels.attention_spec import Flex
    from gptfast.kernels.attention_tuning import largest_tile
    flex = Flex()
    if score_mod is not None:
        flex = flex._replace(score_mod=score_mod.mod.fn, score_grad=score_mod.grad, score_args=score_mod.mod.args,
                             score_grads=score_mod.mod.args)  # the backward's buffers replace them
    if block_mask is not None:
        coarse = block_mask.coarsened(largest_tile(device_arch(device), dtype))
        flex = flex._replace(mask_mod=_mod_functions(coarse.mask_mod), mask_args=_mod_args(coarse.mask_mod),
                             kv_blocks=lists_of(coarse.states), q_blocks=lists_of(coarse.states.transpose(2, 3)),
                             block_size=coarse.block_size)
    return flex


class _FlexAttention(torch.autograd.Function):
    """flex_attention on the kernels: (out, lse) from (q, k, v, score_mod, block_mask, scale, *the score mod's
    tensor args), lse +inf for a row that sees no key (the kernels' convention)."""

    @staticmethod
    def forward(ctx, query, key, value, score_mod, block_mask, scale, *score_tensors):
        from gptfast.kernels.attention import attention_forward
        from gptfast.kernels.attention_spec import Features
        flex = kernel_flex(score_mod, block_mask, query.device, query.dtype)
        out, lse = attention_forward(query, key, value, scale, Features(flex=flex))
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.score_mod, ctx.flex, ctx.scale = score_mod, flex, scale  # the backward reuses the block lists
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from gptfast.kernels.attention import attention_backward
        from gptfast.kernels.attention_spec import Features
        query, key, value, out, lse = ctx.saved_tensors
        score_mod = ctx.score_mod
        args = score_mod.mod.args if score_mod else ()
        tensor_args = [arg for arg in args if isinstance(arg, torch.Tensor)]
        needed = ctx.needs_input_grad[6:]
        _check_differentiable(score_mod, any(needed))
        buffers = {id(arg): torch.zeros_like(arg, dtype=torch.float32) for arg in tensor_args
                   if arg.is_floating_point()}
        flex = ctx.flex._replace(score_grads=tuple(buffers.get(id(a), a) for a in args))
        if any(needed):
            flex = flex._replace(score_arg_grad=score_mod.arg_grad)
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float().contiguous()
        dq, dk, dv, _, _ = attention_backward(grad_out, grad_lse, query, key, value, out, lse, ctx.scale,
                                              Features(flex=flex))
        arg_grads = [buffers[id(arg)].to(arg.dtype) if need else None for arg, need in zip(tensor_args, needed)]
        return dq, dk, dv, None, None, None, *arg_grads


def _check_differentiable(score_mod, args_need_grad):
    """A backward through a score mod needs its derivative, and its argument gradient for args that need one."""
    if score_mod is None:
        return
    name = _name(score_mod.mod.fn)
    if score_mod.grad is None:
        raise RuntimeError(f"score_mod {name} has no derivative, so flex_attention through it is forward-only; give "
                           f"ScoreMod(mod, grad=...) one")
    if args_need_grad and score_mod.arg_grad is None:
        raise RuntimeError(f"an argument of score_mod {name} requires grad, but the mod has no arg_grad to compute "
                           f"it; give ScoreMod(mod, grad, arg_grad=...) one, or detach the argument")


def _is_torch_block_mask(block_mask):
    from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
    return isinstance(block_mask, TorchBlockMask)


def from_torch_block_mask(block_mask, smallest):
    """A gptfast BlockMask from torch's (torch.nn.attention.flex_attention.create_block_mask), with blocks of at
    least `smallest` rows and keys (the kernels' largest tile; BlockMask.coarsened): its block lists give the
    states, and its mask_mod, a PyTorch function, is evaluated once, vmapped as torch's create_mask does, on the
    partial blocks only, into (P, block_q, block_kv) bits that the built-in block_bits mod reads."""
    from gptfast.kernels import mods
    seq_lengths = tuple(block_mask.seq_lengths)
    coarse = BlockMask(_torch_states(block_mask), tuple(block_mask.BLOCK_SIZE), seq_lengths, noop_mask)
    states, block_size = coarse.coarsened(smallest)[:2]
    partial = (states == PARTIAL.value).nonzero()  # (P, 4): batch, head, row, column
    if len(partial) * block_size[0] * block_size[1] >= 2 ** 31:
        raise ValueError(f"this torch BlockMask has {len(partial)} partial blocks of {block_size}: their bits "
                         f"would pass 2**31 entries; make it with gptfast.flex.create_block_mask instead")
    block_index = torch.full(states.shape, -1, dtype=torch.int32, device=states.device)
    block_index[states == FULL.value] = -2
    block_index[tuple(partial.T)] = torch.arange(len(partial), dtype=torch.int32, device=states.device)
    bits = _partial_bits(block_mask.mask_mod, partial, block_size, seq_lengths)
    heads, rows, columns = states.shape[1:]
    args = (bits, block_index.contiguous(), heads * rows * columns if states.shape[0] > 1 else 0,
            rows * columns if heads > 1 else 0, columns, *(size.bit_length() - 1 for size in block_size))
    return BlockMask(states, block_size, seq_lengths,
                     MaskMod.of(mods.block_bits, args, _torch_reference(block_mask.mask_mod)))


def _torch_states(block_mask):
    """(B, H, rows, columns) block states from torch's lists; a FULL block that runs past the keys' end is
    PARTIAL here (the kernels load a full block's keys unmasked)."""
    seqlen_q, seqlen_k = block_mask.seq_lengths
    block_q, block_kv = block_mask.BLOCK_SIZE
    num, indices = block_mask.kv_num_blocks, block_mask.kv_indices
    columns = -(-seqlen_k // block_kv)
    states = torch.zeros((*num.shape, columns), dtype=torch.uint8, device=num.device)
    lists = [(num, indices, PARTIAL.value)]
    if block_mask.full_kv_num_blocks is not None:
        lists.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices, FULL.value))
    for counts, listed, state in lists:
        listed = listed[..., :columns].long()
        taken = torch.arange(listed.shape[-1], device=num.device) < counts[..., None]
        rows = torch.arange(counts.numel(), device=num.device).view(counts.shape)[..., None].expand_as(taken)
        states.view(-1, columns)[rows[taken], listed[taken]] = state
    states = states[:, :, :-(-seqlen_q // block_q)]
    if seqlen_k % block_kv:
        states[..., -1][states[..., -1] == FULL.value] = PARTIAL.value
    return states


def _vmapped(mask_mod, *in_dims):
    """mask_mod, a PyTorch function of four scalar indices, vmapped over in_dims from the innermost out."""
    for dims in in_dims:
        mask_mod = torch.vmap(mask_mod, in_dims=dims)
    return mask_mod


def _partial_bits(mask_mod, partial, block_size, seq_lengths, chunk=1024):
    """(P, block_q, block_kv) bool: the PyTorch mask mod on each partial block's pairs, partial (P, 4) = (batch,
    head, row, column) per block, indices clamped into the sequences; evaluated chunk blocks at a time."""
    block_q, block_kv = block_size
    device = partial.device
    rows = (partial[:, 2:3] * block_q + torch.arange(block_q, device=device)).clamp(max=seq_lengths[0] - 1)
    keys = (partial[:, 3:4] * block_kv + torch.arange(block_kv, device=device)).clamp(max=seq_lengths[1] - 1)
    per_block = _vmapped(mask_mod, (None, None, None, 0), (None, None, 0, None), (0, 0, 0, 0))
    bits = [per_block(partial[i:i + chunk, 0], partial[i:i + chunk, 1], rows[i:i + chunk], keys[i:i + chunk])
            for i in range(0, len(partial), chunk)]
    return torch.cat(bits).bool().contiguous() if bits else torch.zeros((0, *block_size), dtype=torch.bool,
                                                                        device=device)


def _torch_reference(mask_mod):
    """A reference twin (see Mod) for a PyTorch mask mod of scalar indices: vmapped over the (B, H, Tq, Tk) grid
    as torch's create_mask does."""
    def reference(batch, head, q_idx, kv_idx, *args):
        dense = _vmapped(mask_mod, (None, None, None, 0), (None, None, 0, None), (None, 0, None, None),
                         (0, None, None, None))
        return dense(batch.flatten(), head.flatten(), q_idx.flatten(), kv_idx.flatten())
    return reference
