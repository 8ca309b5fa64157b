"""``gptfast generate``: continue a prompt with a GPT-2 checkpoint, streaming the text as it is made.

With no --model it uses the newest checkpoint that `gptfast train` wrote under GPTFAST_HOME/runs, so "train,
then generate" works offline."""
import os
import sys
import time

import torch

from gptfast.checkpoint import resolve
from gptfast.data import gptfast_home
from gptfast.devices import DTYPE_NAMES, device_named, dtype_named
from gptfast.model import GPT
from gptfast.runs import latest_checkpoint, newest_run_checkpoint
from gptfast.tokenizer import load_tokenizer


def add_arguments(parser):
    add = parser.add_argument
    add("--model", help="checkpoint folder, run folder of `gptfast train`, or Hugging Face GPT-2 name (gpt2, "
                        "gpt2-medium, ...); default: the newest checkpoint `gptfast train` wrote")
    add("--prompt", default="\n", help="text to continue (default: a newline)")
    add("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    add("--greedy", action="store_true", help="always take the most likely token (no sampling flags with it)")
    add("--temperature", type=float, default=None, help="sampling temperature, > 0 (default 0.8)")
    add("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    add("--top-p", type=float, default=None, help="sample among the most likely tokens whose probability sums to p")
    add("--seed", type=int, default=None, help="random seed, for a reproducible sample")
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    add("--dtype", choices=DTYPE_NAMES, default="auto",
        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    add("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
        help="the KV cache's dtype: auto (the model's) or fp8 (float8 e4m3, per-head scales: half the memory)")


def check_arguments(args):
    """The flags, checked before any model is loaded (ValueError naming the flag)."""
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be at least 0, got {args.max_new_tokens}")
    if args.greedy and (args.temperature, args.top_k, args.top_p) != (None, None, None):
        raise ValueError("--greedy takes no --temperature, --top-k or --top-p; choose one")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}; for the most likely tokens use --greedy")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")


def model_folder(model):
    """The checkpoint folder --model names (the latest checkpoint of a run folder), or the newest run's."""
    if model is None:
        return newest_run_checkpoint(os.path.join(gptfast_home(), "runs"))
    return latest_checkpoint(model) or resolve(model)


def main(args):
    check_arguments(args)
    device = device_named(args.device)
    folder = model_folder(args.model)
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    dtype = dtype_named(args.dtype, device)
    model = GPT.from_pretrained(folder, device=device, dtype=dtype).eval()
    print(f"[model {folder} on {device}, {dtype}]", file=sys.stderr, flush=True)
    room = model.config.block_size - len(ids)
    if room < 0:
        raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's block size "
                         f"({model.config.block_size}); shorten --prompt")
    max_new_tokens = min(args.max_new_tokens, room)
    if max_new_tokens < args.max_new_tokens:
        print(f"[the model's block size is {model.config.block_size} tokens: generating {max_new_tokens} new "
              f"tokens, not {args.max_new_tokens}]", file=sys.stderr, flush=True)
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    sys.stdout.write(args.prompt)
    new, shown = [], [""]

    def stream(token):
        new.append(token[0].item())
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # hold back a character whose bytes have not all arrived
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    start = time.perf_counter()
    model.generate(torch.tensor([ids], device=device), max_new_tokens, do_sample=not args.greedy,
                   temperature=0.8 if args.temperature is None else args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_token_id=tokenizer.eos_token_id, generator=generator, on_token=stream,
                   kv_cache_dtype=args.kv_cache_dtype)
    seconds = time.perf_counter() - start
    sys.stdout.write(tokenizer.decode(new)[len(shown[0]):] + "\n")
    print(f"[{len(new)} tokens in {seconds:.2f} s: {len(new) / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0
