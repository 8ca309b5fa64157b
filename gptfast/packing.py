"""Sequences packed into one row: the cumulative lengths the varlen kernels take, and each token's place.

Training packs documents into rows so that no token is padding, and generation packs prompts of different
lengths into one prefill; both hand the model a Packed, and the attention then runs flash_attn_varlen_func's
kernels, so that no token attends across a sequence's boundary.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packed:
    """cu_seqlens: int32 (n + 1,), the varlen kernels' boundaries. positions: int64 (total,), each token's position
    in its own sequence (what the position embedding sees). sequence: int64 (total,), the sequence of each token.
    total: the tokens in all; max_seqlen: at least the longest sequence (sizes the kernels' grid: training passes
    its block size, so that every batch has the same one and torch.compile never recompiles for it). Built on
    the host from known lengths, so it is valid without reading the device."""
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    sequence: torch.Tensor
    total: int
    max_seqlen: int

    @classmethod
    def from_lengths(cls, lengths, device, max_seqlen=None):
        lengths = [int(n) for n in lengths]
        if not lengths or min(lengths) < 0:
            raise ValueError(f"Packed needs one or more sequence lengths, each >= 0, got {lengths}")
        if max_seqlen is not None and max_seqlen < max(lengths):
            raise ValueError(f"max_seqlen {max_seqlen} is below the longest sequence ({max(lengths)})")
        counts = torch.tensor(lengths)
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seqlens[1:] = counts.cumsum(0)
        sequence = torch.repeat_interleave(torch.arange(len(lengths)), counts)
        positions = torch.arange(sum(lengths)) - cu_seqlens[:-1].long()[sequence]
        return cls(cu_seqlens.to(device), positions.to(device), sequence.to(device), sum(lengths),
                   max(lengths) if max_seqlen is None else max_seqlen)

    def lengths(self):
        """int32 (n,) on the device."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def last_tokens(self):
        """Index of each sequence's last token in the packed row (sequences must not be empty)."""
        return self.cu_seqlens[1:].long() - 1
