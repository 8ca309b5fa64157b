"""--device and --dtype as `gptfast train` and `gptfast generate` take them: checked before any work starts (a
ValueError naming the flag), then turned into torch objects."""
import torch

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def device_named(name):
    """cpu, cuda, cuda:N or auto (cuda when available, else cpu) as a torch.device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA device that torch can use; "
                             "use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    return device


def dtype_named(name, device):
    """--dtype's value as a torch dtype; auto is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
