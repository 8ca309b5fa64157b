"""The check that every rank of a group passes tensors of one shape: a rank that sent or awaited a differently
sized message would otherwise wait until the group's timeout, or read garbage."""
import torch
import torch.distributed as dist

_agreed = set()  # (group, local signature) pairs every rank has confirmed


def check_same_shapes(group, *tensors):
    """Raises a ValueError on every rank unless every rank of group passes tensors of the same shapes and dtypes:
    one all_gather of the signatures per new local signature (skipped under torch.compile). A shape that changes
    on some ranks only, later, is left to the group's timeout."""
    if torch.compiler.is_compiling():
        return
    signature = tuple((tuple(t.shape), str(t.dtype)) for t in tensors)
    if (id(group), signature) in _agreed:
        return
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, signature, group=group)
    if any(other != signature for other in everyone):
        raise ValueError(f"every rank of the group must pass tensors of the same shapes and dtypes; got, by rank: "
                         f"{everyone}")
    _agreed.add((id(group), signature))
