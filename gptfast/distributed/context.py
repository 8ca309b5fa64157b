"""A model's place in a context-parallel group (`gptfast train --context-parallel N`): its sequences arrive
zigzag-sharded over the group's ranks, its attention runs ring_attention or all_to_all_attention over them, and
its position embeddings take each token's position in the whole sequence."""
from typing import NamedTuple

from gptfast.distributed.ring import ring_attention
from gptfast.distributed.ulysses import all_to_all_attention
from gptfast.distributed.zigzag import positions, zigzag_shard

METHODS = ("ring", "all-to-all")


class ContextParallel(NamedTuple):
    """group: the process group of the ranks that share each sequence; rank, world: this rank's index in it and
    its size; method: one of METHODS."""
    group: object
    rank: int
    world: int
    method: str = "ring"

    def shard(self, x):
        """This rank's tokens of x (B, T, ...): (B, T / world, ...)."""
        return zigzag_shard(x, self.rank, self.world)

    def positions(self, local_length, device):
        """int64 (local_length,): the positions in the whole sequence of this rank's tokens."""
        return positions(local_length * self.world, self.rank, self.world, device=device)

    def causal_attention(self, q, k, v):
        """Causal attention of this rank's shards q (B, T / world, Hq, D), k, v (B, T / world, Hkv, D) over the
        whole sequence."""
        if self.method == "ring":
            return ring_attention(q, k, v, self.group, causal=True)
        return all_to_all_attention(q, k, v, self.group, layout="zigzag", causal=True)
