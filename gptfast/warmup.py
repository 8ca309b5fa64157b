"""``gptfast warmup``: compile and tune, once, what a model will run, so that a job or a service pays it up front.

The kernels compile on first use and their autotuners time every config of each new (kernel, length bucket, head
dim, features) key. This runs a training step at each --train shape and a generation (a prefill and decoding
steps, through the KV cache) from each --prefill length (default: a prompt in each power-of-two length bucket up
to the model's block size: the autotuners tune per bucket, attention_tuning.length_bucket), with progress and ETA.
Triton keeps the compiled kernels on disk and gptfast's autotuners their timings (gptfast.kernels.autotune), so
later processes on this machine find nothing to compile or time for those shapes.
"""
import time

import torch

from gptfast.devices import DTYPE_NAMES, device_named, dtype_named
from gptfast.generate import model_folder
from gptfast.model import GPT
from gptfast.progress import Progress, duration


def add_arguments(parser):
    add = parser.add_argument
    add("--model", help="checkpoint folder, run folder of `gptfast train`, or Hugging Face GPT-2 name (gpt2, "
                        "gpt2-medium, ...); default: the newest checkpoint `gptfast train` wrote")
    add("--train", metavar="BxT", action="append", default=[],
        help="a training step's batch size and sequence length, e.g. 8x1024 (repeatable; default: none)")
    add("--prefill", metavar="T", type=int, action="append",
        help="a prompt length to generate from (repeatable; default: one in each power-of-two bucket from 16 "
             "to the block size)")
    add("--batch-size", type=int, default=1, help="prompts per generation (default 1)")
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    add("--dtype", choices=DTYPE_NAMES, default="auto",
        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")


def train_shape(text):
    """'8x1024' -> (8, 1024)."""
    try:
        batch, length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--train takes BATCHxLENGTH, such as 8x1024; got {text!r}") from None
    if batch < 1 or length < 1:
        raise ValueError(f"--train {text}: the batch and the length must be at least 1")
    return batch, length


def check_arguments(args):
    """The flags, checked before the model is loaded (ValueError naming the flag); returns the --train shapes."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if any(length < 1 for length in args.prefill or ()):
        raise ValueError(f"--prefill must be at least 1, got {min(args.prefill)}")
    return [train_shape(text) for text in args.train]


def prompt_lengths(shapes, lengths, block_size):
    """The prompt lengths to warm up, after checking them and the --train shapes against the model's block size:
    those given, or the largest of each power-of-two bucket from 16 to the block size, each leaving room for the
    2 tokens generated after it."""
    if any(length > block_size for _, length in shapes):
        raise ValueError(f"--train: a sequence length is past the model's block size ({block_size})")
    if lengths is None:
        buckets = [1 << n for n in range(4, (block_size - 1).bit_length() + 1)]
        lengths = [min(bucket, block_size - 2) for bucket in buckets if block_size > 2]
    if any(length > block_size - 2 for length in lengths):
        raise ValueError(f"--prefill: a prompt must be at most {block_size - 2} tokens (the model's block size "
                         f"less the 2 tokens generated after it)")
    return sorted(set(lengths))


def steps(model, train, prefill, batch_size, device):
    """(label, function) for each piece of work: training steps, then generations."""
    generator = torch.Generator().manual_seed(0)

    def tokens(batch, length):
        return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)

    def train_step(batch, length):
        model.train()
        model.loss(tokens(batch, length), tokens(batch, length)).backward()
        model.zero_grad(set_to_none=True)

    def generation(length):
        model.eval()
        with torch.no_grad():
            model.generate(tokens(batch_size, length), 2, do_sample=False)

    return ([(f"train {b}x{t}", lambda b=b, t=t: train_step(b, t)) for b, t in train]
            + [(f"generate from {t} tokens", lambda t=t: generation(t)) for t in prefill])


def main(args):
    shapes = check_arguments(args)
    device = device_named(args.device)
    folder = model_folder(args.model)
    model = GPT.from_pretrained(folder, device=device, dtype=dtype_named(args.dtype, device))
    lengths = prompt_lengths(shapes, args.prefill, model.config.block_size)
    work = steps(model, shapes, lengths, args.batch_size, device)
    print(f"[warming up {folder} on {device}: {len(work)} steps]", flush=True)
    progress, start = Progress(len(work)), time.perf_counter()
    for done, (label, run) in enumerate(work, 1):
        run()
        progress.report(done, f"warmup ({label})")
    print(f"[warm: {len(work)} steps in {duration(time.perf_counter() - start)}; compiled kernels and tuning "
          f"timings are in Triton's cache directory]", flush=True)
    return 0
