"""What a new process waits for before its first training step is done: gpu_check.sh runs this with Triton's cache
directory empty, then again with it warm (the same directory), then after `gptfast warmup` filled a new one.

The step is `gptfast warmup`'s: GPT-2's loss and its backward (no optimizer) on random tokens, in bfloat16 on a
GPU (float32 on a CPU). Each record: the model's loading time, the first step's (its kernels compiled and their
configs timed, or read from the cache) and the second's (what a step costs once all is built), synchronised.

usage: python benchmarks/first_step.py save FOLDER [--small]    a randomly initialised GPT-2 small (or a tiny one)
       python benchmarks/first_step.py step FOLDER BxT LABEL JSONL  one record appended to JSONL
"""
import json
import sys
import time

import torch

from gptfast.config import GPTConfig
from gptfast.devices import device_named, dtype_named
from gptfast.model import GPT
from gptfast.warmup import train_shape

TINY = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32)


def save(folder, small):
    torch.manual_seed(0)
    GPT(TINY if small else GPTConfig()).save_pretrained(folder)


def timed(run, device):
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def step(folder, shape, label, output):
    device = device_named("auto")
    batch, length = train_shape(shape)
    start = time.perf_counter()
    model = GPT.from_pretrained(folder, device=device, dtype=dtype_named("auto", device)).train()
    load_s = time.perf_counter() - start
    tokens = torch.randint(0, model.config.vocab_size, (2, batch, length), device=device)

    def train_step():
        model.loss(tokens[0], tokens[1]).backward()
        model.zero_grad(set_to_none=True)

    record = dict(label=label, shape=shape, device=str(device), load_s=round(load_s, 2),
                  first_step_s=round(timed(train_step, device), 3), second_step_s=round(timed(train_step, device), 4))
    print(json.dumps(record), flush=True)
    with open(output, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "save":
        save(sys.argv[2], "--small" in sys.argv[3:])
    elif len(sys.argv) == 6 and sys.argv[1] == "step":
        step(*sys.argv[2:])
    else:
        sys.exit(__doc__)
