"""Context parallelism: one sequence sharded over the ranks of a torch.distributed group (NCCL on GPUs, gloo on
the CPU). ring_attention passes keys and values around the ranks; all_to_all_attention trades sequence shards for
head shards; zigzag_shard and zigzag_unshard lay a sequence out so that causal work is balanced."""
from gptfast.distributed.ring import ring_attention
from gptfast.distributed.ulysses import all_to_all_attention
from gptfast.distributed.zigzag import positions, zigzag_shard, zigzag_unshard

__all__ = ["all_to_all_attention", "positions", "ring_attention", "zigzag_shard", "zigzag_unshard"]
