"""``gptfast train``: train a GPT on gptfast's kernels, on one device or data-parallel under torchrun.

    gptfast train                                   # a small byte-level model on Python's standard library
    gptfast train --data corpus/ --tokenizer gpt2-folder/ --n-layer 12 --n-embd 768
    torchrun --nproc_per_node=2 -m gptfast train    # DDP: NCCL on CUDA, gloo on CPU; rank 0 logs and saves
    torchrun --nproc_per_node=8 -m gptfast train --fsdp ...   # FSDP2: parameters, gradients, AdamW state sharded
    torchrun --nproc_per_node=8 -m gptfast train --context-parallel 4 ...  # each sequence over 4 ranks, 2 batches

The run folder (--out) is laid out and guarded as gptfast.runs describes: one trainer at a time, log.jsonl,
checkpoint-<step>/ folders and ``latest``. SIGINT or SIGTERM saves a checkpoint and exits. --resume continues a
run exactly: with the run's own settings, its optimizer, schedule, batches and random state.
"""
import dataclasses
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch

from gptfast import backend, checkpoint
from gptfast.data import Batches, gptfast_home, prepare
from gptfast.devices import DTYPE_NAMES, device_named, dtype_named
from gptfast.distributed.context import METHODS, ContextParallel
from gptfast.model import GPT, GPTConfig
from gptfast.progress import Progress
from gptfast.runs import RunFolder, load_train_state
from gptfast.tokenizer import ByteTokenizer, load_tokenizer

# A run's settings: what makes it the run it is. A flag left out takes its value from here in a new run, and the
# run's own on --resume, which refuses a flag that changes one unless --allow-changes; the model's shape and its
# tokenizer never change. min_lr defaults to lr / 10 and lr_decay_iters to --max-iters. The default run trains for
# about 8 minutes on a 2-core CPU (measured 2026-11-29, val 1.487), after which `gptfast generate` writes
# recognisable Python.
MODEL_SHAPE = dict(n_layer=4, n_head=6, n_embd=192, block_size=256)
DEFAULTS = dict(MODEL_SHAPE, dropout=0.0, data=None, tokenizer="bytes", batch_size=8, grad_accum=1, seed=1337,
                dtype="auto", lr=2e-3, min_lr=None, warmup_iters=100, lr_decay_iters=None, weight_decay=0.1,
                grad_clip=1.0, pack=False)
FIXED = (*MODEL_SHAPE, "tokenizer")
# Dense bf16 tensor-core peaks (vendor datasheets), for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flag(name):
    return "--" + name.replace("_", "-")


def add_arguments(parser):
    add = parser.add_argument
    add("--data", help="a text file or a folder of text files (default: Python's standard library sources)")
    add("--tokenizer", help="a folder with a GPT-2 BPE tokenizer (tokenizer.json, or vocab.json and merges.txt); "
                            "default: bytes (vocab 256)")
    add("--out", help="run folder for the log and checkpoints (default: GPTFAST_HOME/runs/<date-time>, where "
                      "`gptfast generate` looks when given no --model)")
    add("--resume", action="store_true", help="continue the run in --out from its latest checkpoint, exactly, "
                                              "with the run's own settings")
    add("--allow-changes", action="store_true",
        help="with --resume: accept flags that change the run's data, batches, optimizer or schedule (the resume "
             "is then not exact; the changes are logged); without it they are refused")
    add("--init-from", help="start from a gptfast or Hugging Face GPT-2 checkpoint folder or hub name (fine-tune)")
    add("--max-iters", type=int, default=2000, help="optimizer steps in all; may grow on --resume (default 2000)")
    add("--batch-size", type=int, help=f"sequences per micro-batch per rank (default {DEFAULTS['batch_size']})")
    add("--block-size", type=int, help=f"sequence length (default {DEFAULTS['block_size']})")
    add("--n-layer", type=int, help=f"transformer blocks (default {DEFAULTS['n_layer']})")
    add("--n-head", type=int, help=f"attention heads (default {DEFAULTS['n_head']})")
    add("--n-embd", type=int, help=f"embedding width (default {DEFAULTS['n_embd']})")
    add("--dropout", type=float, help="dropout on embeddings, residual branches and attention weights (default 0)")
    add("--lr", type=float, help=f"peak learning rate (default {DEFAULTS['lr']})")
    add("--min-lr", type=float, help="learning rate at the end of the cosine decay (default lr / 10)")
    add("--warmup-iters", type=int, help=f"linear warmup steps (default {DEFAULTS['warmup_iters']})")
    add("--lr-decay-iters", type=int, help="steps of the cosine decay (default --max-iters)")
    add("--weight-decay", type=float, help=f"AdamW weight decay, on matrices only (default {DEFAULTS['weight_decay']})")
    add("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    add("--grad-clip", type=float, help="clip the gradient norm to this; 0 disables (default 1)")
    add("--seed", type=int, help=f"random seed (default {DEFAULTS['seed']})")
    add("--dtype", choices=DTYPE_NAMES,
        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU); weights stay float32")
    add("--eval-interval", type=int, default=200,
        help="evaluate and save a checkpoint every N steps, and at the end (default 200; a new run also evaluates "
             "at step 0)")
    add("--eval-iters", type=int, default=20, help="batches per loss estimate (default 20)")
    add("--log-interval", type=int, default=10, help="log every N steps (default 10)")
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    add("--kernels", choices=("auto", "triton", "torch"), default="auto",
        help="triton: gptfast's fused kernels (an error where they cannot run); torch: the plain PyTorch "
             "reference, to compare; auto: the kernels where they run, else PyTorch")
    add("--pack", action="store_true", default=None,
        help="pack documents: cut each window at the files (and end-of-text tokens) it crosses, so no token attends "
             "across a document; off by default, as in nanoGPT and GPT-2's training, whose windows cross documents")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--context-parallel", type=int, default=1, metavar="N",
        help="under torchrun, shard each sequence over groups of N ranks (context parallelism: long sequences; the "
             "batch is split over the groups, data x context); --block-size a multiple of 2N (default 1)")
    add("--cp-method", choices=METHODS, default="ring",
        help="context parallelism's attention: ring (keys and values passed around the group, the default) or "
             "all-to-all (DeepSpeed Ulysses: sequence shards traded for head shards; --n-head a multiple of N)")
    add("--fsdp", action="store_true",
        help="under torchrun, shard the model, gradients and optimizer state over the ranks with FSDP2 (each block, "
             "then the root) instead of replicating them with DDP; for models whose training state does not fit one "
             "device")


def check_arguments(args):
    """Everything about the flags that can be known before any model or data is loaded (ValueError or
    FileNotFoundError naming the flag). Resolves --init-from to its folder."""
    for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                 "block_size", "n_layer", "n_head", "n_embd", "lr_decay_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup_iters", "lr", "min_lr", "weight_decay", "grad_clip"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            raise ValueError(f"{flag(name)} must be at least 0, got {getattr(args, name)}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out, the run folder to continue")
    if args.resume and args.init_from:
        raise ValueError("--resume and --init-from exclude each other: a resumed run starts from its own checkpoint")
    if args.allow_changes and not args.resume:
        raise ValueError("--allow-changes goes with --resume")
    for name in ("n_layer", "n_head", "n_embd"):
        if args.init_from and getattr(args, name) is not None:
            raise ValueError(f"{flag(name)}: with --init-from the model's shape is the checkpoint's; drop the flag")
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such folder (give one holding tokenizer.json, "
                                "or vocab.json and merges.txt)")
    if args.data and not os.path.exists(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such file or folder")
    if args.fsdp and "RANK" not in os.environ:
        raise ValueError("--fsdp shards over the ranks torchrun starts: run `torchrun --nproc_per_node=N -m gptfast "
                         "train --fsdp ...`")
    if args.context_parallel < 1:
        raise ValueError(f"--context-parallel must be at least 1, got {args.context_parallel}")
    if args.context_parallel > 1:
        size, world = args.context_parallel, int(os.environ.get("WORLD_SIZE", "1"))
        if "RANK" not in os.environ or world % size:
            raise ValueError(f"--context-parallel {size} shards each sequence over that many of the ranks torchrun "
                             f"starts (a multiple of it): run `torchrun --nproc_per_node={size} -m gptfast train "
                             f"--context-parallel {size} ...`")
        if args.pack or args.dropout:
            raise ValueError("--context-parallel does not take --pack or --dropout yet: drop them (packed documents "
                             "would each need a length that splits into 2N pieces; ring attention has no dropout)")
    if args.fsdp and args.dtype == "float16":
        raise ValueError("--fsdp with --dtype float16 is not supported (its loss scaling does not shard); use bfloat16")
    device = device_named(args.device)
    if args.kernels == "triton" and device.type != "cuda" and not backend.INTERPRETER:
        raise ValueError(f"--kernels triton: the Triton kernels need a CUDA device, and the device is {device}; use "
                         "--kernels auto (PyTorch where the kernels cannot run) or --kernels torch")
    if args.init_from:
        args.init_from = checkpoint.resolve(args.init_from)


def run_settings(args, saved, device):
    """The run's settings and what a resume changes of them: ({name: value}, {name: (run's value, new value)}).
    A new run takes the flags given, else the --init-from checkpoint's shape, else DEFAULTS; a resumed run takes
    its saved settings with the flags given, refusing changes (see DEFAULTS)."""
    given = {name: _setting(name, getattr(args, name), device) for name in DEFAULTS if getattr(args, name) is not None}
    if saved is None:
        settings = {**DEFAULTS, "dtype": _setting("dtype", "auto", device)}
        if args.init_from:
            config = checkpoint.read_config(args.init_from)
            settings.update({name: getattr(config, name) for name in MODEL_SHAPE}, tokenizer=args.init_from)
        settings.update(given)
        settings["min_lr"] = settings["lr"] / 10 if settings["min_lr"] is None else settings["min_lr"]
        settings["lr_decay_iters"] = settings["lr_decay_iters"] or args.max_iters
        return settings, {}
    saved = {**DEFAULTS, **saved}  # a run saved before a setting existed ran with its default
    changes = {name: (saved[name], value) for name, value in given.items() if value != saved[name]}
    refused = [name for name in changes if name in FIXED or not args.allow_changes]
    if refused:
        listing = "; ".join(f"{flag(n)} is {changes[n][1]!r}, the run's is {changes[n][0]!r}" for n in refused)
        remedy = ("drop those flags, or start a new run with another --out" if set(refused) & set(FIXED) else
                  "drop those flags, or add --allow-changes to accept them (the resume is then not exact)")
        raise ValueError(f"--resume: {listing}; {remedy}")
    return {**saved, **given}, changes


def _setting(name, value, device):
    """A flag's value as a run records it: folders as absolute paths, --dtype resolved for the device."""
    if name in ("data", "tokenizer") and value not in (None, "bytes"):
        return os.path.abspath(value)
    if name == "dtype":
        return str(dtype_named(value, device)).removeprefix("torch.")
    return value


def model_config(args, settings, state, tokenizer):
    """The GPTConfig of the resumed run, of the --init-from checkpoint, or of a new model; dropout as set."""
    if state is not None:
        config = GPTConfig(**state["config"])
    elif args.init_from:
        config = checkpoint.read_config(args.init_from)
        if settings["block_size"] > config.block_size:
            raise ValueError(f"--block-size {settings['block_size']} exceeds the checkpoint's {config.block_size}")
    else:
        config = GPTConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                           **{name: settings[name] for name in MODEL_SHAPE})
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    return dataclasses.replace(config, dropout=settings["dropout"])


def lr_at(step, settings):
    """Linear warmup to lr, then cosine decay to min_lr over lr_decay_iters, then flat."""
    lr, min_lr, warmup, decay = (settings[k] for k in ("lr", "min_lr", "warmup_iters", "lr_decay_iters"))
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= decay:
        return min_lr
    progress = (step - warmup) / max(1, decay - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def setup_distributed(device_arg):
    """(rank, world_size, device). Under torchrun (RANK set) joins the process group: NCCL on CUDA, else gloo."""
    device = device_named(device_arg)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    return rank, world, device


def any_rank(flag_value, world, device):
    """True on every rank when any rank's flag is set, so that all ranks act at the same step."""
    if world == 1:
        return flag_value
    value = torch.tensor([float(flag_value)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


@contextmanager
def stop_requests():
    """Inside the block, SIGINT and SIGTERM only set the event it yields, so the loop can save and stop at a step
    boundary; the previous handlers come back afterwards."""
    requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda number, frame: requested.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def shard(model):
    """FSDP2 (torch.distributed.fsdp.fully_shard): each block, then the root (embeddings, the final norm and the
    tied head), so that a block's parameters are gathered just before it runs and freed after. Before the
    optimizer is made: it must hold the sharded parameters."""
    from torch.distributed.fsdp import fully_shard
    # A block returns its residual stream as a view of the fused add + norm's output; FSDP2 warns that an in-place
    # op on such a view would skip its hooks. GPT never modifies a block's outputs in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def gathered(value, world):
    """[value of each rank] (a collective), or [value] alone."""
    if world == 1:
        return [value]
    values = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


class Trainer:
    """One rank's model, optimizer, batches and mixed precision, and what the loop does with them: a training
    step, an evaluation, a checkpoint. Data-parallel under torchrun: DDP, or FSDP2 with fsdp."""

    def __init__(self, model, settings, splits, device, rank, world, compile_model=False, fsdp=False, context=None):
        self.model, self.settings, self.splits, self.device = model, settings, splits, device
        self.rank, self.world, self.fsdp, self.context = rank, world, fsdp, context
        self.block_size = settings["block_size"]
        # With context parallelism a group of ranks shares each batch, every rank taking its tokens of each
        # sequence: its loss is the mean over them, and DDP's (or FSDP's) mean over all ranks is the batch's.
        share = 1 if context is None else context.world
        data_rank, data_world = rank // share, world // share
        model.use_context_parallel(context)
        # Where documents begin, found once per split (a scan of the tokens when the tokenizer has an end-of-text).
        self.document_starts = ({name: corpus.document_starts(model.config.eos_token_id)
                                 for name, corpus in splits.items()} if settings["pack"] else {})
        self.batches = self.sampler("train", settings["seed"], shard=(data_rank, data_world))
        if fsdp:
            shard(model)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings["weight_decay"]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # no decay: biases, norms
        self.optimizer = torch.optim.AdamW(groups, lr=settings["lr"], betas=(0.9, 0.95), fused=device.type == "cuda")
        self.dtype = getattr(torch, settings["dtype"])
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.forward = torch.compile(model) if compile_model else model
        if world > 1 and not fsdp:
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[device.index] if device.type == "cuda" else None)
        self.tokens_per_step = settings["batch_size"] * self.block_size * settings["grad_accum"] * data_world

    def local(self, x, y):
        """This rank's tokens of a batch: all of them, or its shard of each sequence under context parallelism."""
        return (x, y) if self.context is None else (self.context.shard(x), self.context.shard(y))

    def sampler(self, split, seed, shard=(0, 1)):
        """Batches of a split; with --pack, cut at its documents (files, and end-of-text tokens where the
        tokenizer has one)."""
        return Batches(self.splits[split].tokens, self.settings["batch_size"], self.block_size, seed, shard,
                       self.document_starts.get(split))

    def autocast(self):  # a fresh context each use; float32 runs without autocast
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def step(self, lr):
        """One optimizer step at learning rate lr. Returns its loss: a tensor, left on the device (no sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.settings["grad_accum"]
        loss_sum = 0.0
        for micro in range(accum):
            x, y, packed = self.batches.next(self.device)
            x, y = self.local(x, y)
            # Gradients are reduced across ranks on the last micro-batch only.
            last = micro == accum - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            sync = nullcontext() if self.world == 1 or self.fsdp or last else self.forward.no_sync()
            with sync, self.autocast():
                loss = self.forward(x, y, packed) / accum  # the fused loss: no logits held
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if self.settings["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def mean_over_ranks(self, value):
        """A tensor averaged over the ranks (the loss of the whole global batch), on every rank."""
        if self.world > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    @torch.no_grad()
    def evaluate(self, eval_iters):
        """Mean loss over eval_iters batches of each split, the same batches every time: {split: loss}."""
        self.model.eval()
        losses = {}
        for name, corpus in self.splits.items():
            if len(corpus.tokens) < self.block_size + 2:
                continue
            sampler = self.sampler(name, self.settings["seed"] + 999)
            total = 0.0
            for _ in range(eval_iters):
                x, y, packed = sampler.next(self.device)
                with self.autocast():
                    loss = self.model(*self.local(x, y), packed)
                if self.context is not None:  # the group's ranks hold equal shares of the sequence
                    torch.distributed.all_reduce(loss, group=self.context.group)
                    loss /= self.context.world
                total += loss.item()
            losses[name] = total / eval_iters
        self.model.train()
        return losses

    def save(self, run, tokenizer, step):
        """A checkpoint of this step: every rank takes part in gathering the state; run's writer writes it."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        # Whole tensors, not shards: the weights gathered to rank 0's CPU; the optimizer's to every rank (torch
        # 2.13's get_optimizer_state_dict fails on the other ranks when asked for rank 0's CPU alone).
        weights = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                           cpu_offload=self.world > 1))
        optimizer = get_optimizer_state_dict(self.model, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True))
        state = {"iter": step, "settings": self.settings, "config": dataclasses.asdict(self.model.config),
                 "optimizer": optimizer,
                 "scaler": self.scaler.state_dict(), "world": self.world,
                 "context_parallel": 1 if self.context is None else self.context.world,
                 "batches_rng": self.batches.generator.get_state(),
                 "torch_rng": gathered(torch.get_rng_state(), self.world)}
        if self.device.type == "cuda":
            state["cuda_rng"] = gathered(torch.cuda.get_rng_state(self.device), self.world)
        run.save(self.model, tokenizer, state, weights=weights)

    def restore(self, state):
        """Puts a checkpoint's optimizer, scaler and random states back (the weights were loaded before)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        context = 1 if self.context is None else self.context.world
        if (state["world"], state.get("context_parallel", 1)) != (self.world, context):
            raise ValueError(f"--resume: the run was saved with {state['world']} ranks, --context-parallel "
                             f"{state.get('context_parallel', 1)}; resume it with the same (now {self.world}, "
                             f"{context}) to continue it exactly")
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.batches.generator.set_state(state["batches_rng"])
        torch.set_rng_state(state["torch_rng"][self.rank])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"][self.rank], self.device)


def evaluation_record(trainer, step, eval_iters):
    """The evaluation's log fields and text: eval_<split>_loss, and val_loss (what plots draw)."""
    losses = trainer.evaluate(eval_iters)
    record = {f"eval_{name}_loss": loss for name, loss in losses.items()}
    if "val" in losses:
        record["val_loss"] = losses["val"]
    return record, "  eval " + "  ".join(f"{name} {loss:.4f}" for name, loss in losses.items())


def train_loop(trainer, run, tokenizer, start, args, say):
    """Steps from `start` to --max-iters: a log line every --log-interval steps, an evaluation and a checkpoint
    every --eval-interval and at the end; SIGINT or SIGTERM saves and stops at the next step boundary. Returns
    whether it was stopped."""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items()
                 if trainer.device.type == "cuda" and k in torch.cuda.get_device_name(trainer.device)), None)
    flops_per_step = trainer.model.flops_per_token(trainer.block_size) * trainer.tokens_per_step
    if start == 0:  # the untrained model's loss: a run stopped early still has a val curve
        record, text = evaluation_record(trainer, 0, args.eval_iters)
        run.log({"iter": 0, **record})
        say(f"step 0/{args.max_iters} {text}")
    progress = Progress(args.max_iters, done=start, stream=sys.stdout)
    step, timed_from, timed_step = start, time.perf_counter(), start
    with stop_requests() as stop:
        while step < args.max_iters:
            if any_rank(stop.is_set(), trainer.world, trainer.device):
                trainer.save(run, tokenizer, step)
                progress.clear()
                say(f"stopped by a signal at step {step}: checkpoint saved in {run.folder}; continue with "
                    f"`gptfast train --resume --out {run.folder}`")
                return True
            lr = lr_at(step, trainer.settings)
            loss = trainer.step(lr)
            step += 1
            progress.draw(step, "training")
            evaluate = step % args.eval_interval == 0 or step == args.max_iters
            if step % args.log_interval == 0 or evaluate:
                seconds = (time.perf_counter() - timed_from) / (step - timed_step)
                record = {"iter": step, "train_loss": trainer.mean_over_ranks(loss).item(), "lr": lr,
                          "ms_per_iter": 1000 * seconds,
                          "tokens_per_s": trainer.tokens_per_step / seconds, "elapsed_s": progress.elapsed()}
                text = (f"step {step}/{args.max_iters}  loss {record['train_loss']:.4f}  lr {lr:.2e}  "
                        f"{1000 * seconds:.1f} ms/step  {record['tokens_per_s']:,.0f} tok/s")
                if peak:
                    record["mfu"] = flops_per_step / seconds / (peak * trainer.world)
                    text += f"  MFU {100 * record['mfu']:.1f}%"
                if evaluate:
                    extra, eval_text = evaluation_record(trainer, step, args.eval_iters)
                    record.update(extra)
                    text += eval_text
                run.log(record)
                progress.clear()
                say(f"{text}  [{progress.status(step)}]")
                timed_from, timed_step = time.perf_counter(), step  # evaluation time is not training time
            if evaluate:
                trainer.save(run, tokenizer, step)
    return False


def resumed_run(run, resume):
    """(checkpoint folder, train state) that --resume continues from, or (None, None) for a new run."""
    if not resume:
        return None, None
    folder = run.latest()
    if folder is None:
        raise FileNotFoundError(f"--resume: {run.folder} holds no checkpoint (no 'latest' file); drop --resume to "
                                "start a new run there")
    state = load_train_state(folder)
    if "settings" not in state:
        raise ValueError(f"--resume: {folder} was written by a gptfast that did not record a run's settings, so an "
                         f"exact resume cannot be checked; start a new run with --init-from {folder}")
    return folder, state


def run_tokenizer(resumed, args):
    """The resumed run's tokenizer, --tokenizer's, the --init-from checkpoint's, or bytes."""
    source = resumed or args.tokenizer or args.init_from
    return load_tokenizer(source) if source else ByteTokenizer()


def load_splits(settings, tokenizer, rank, world):
    """{split: tokens}. Rank 0 tokenizes into the shared cache first; the others then read it (no two writers)."""
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    splits = prepare(settings["data"], tokenizer, settings["tokenizer"], progress=rank == 0)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    return splits


def continue_run(trainer, run, state, changes, say):
    """Puts the saved state back, cuts the log back to the resumed step and records the resume. Returns the step."""
    trainer.restore(state)
    run.cut_log(state["iter"])
    run.log({"iter": state["iter"], "resumed": True, "changes": changes})
    say(f"resuming {run.folder} at step {state['iter']}" + "".join(
        f"; {flag(name)} {new!r} (was {old!r})" for name, (old, new) in changes.items()))
    return state["iter"]


def main(args):
    """`gptfast train`, top to bottom: flags, ranks, run folder, settings, tokenizer and model, data, trainer,
    loop."""
    check_arguments(args)
    rank, world, device = setup_distributed(args.device)
    say = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
    out = args.out or os.path.join(gptfast_home(), "runs", time.strftime("%Y%m%d-%H%M%S"))
    with RunFolder(out, writer=rank == 0) as run:
        resumed, state = resumed_run(run, args.resume)
        settings, changes = run_settings(args, state and state["settings"], device)
        tokenizer = run_tokenizer(resumed, args)
        torch.manual_seed(settings["seed"])  # one initialisation on every rank (FSDP shards it as it is)
        model = GPT(model_config(args, settings, state, tokenizer))
        if resumed or args.init_from:
            checkpoint.load_state(model, resumed or args.init_from)
        model.to(device)
        torch.manual_seed(settings["seed"] + rank)  # dropout: each rank its own (a resume restores them)
        splits = load_splits(settings, tokenizer, rank, world)
        context = context_parallel(args, model.config, world, device)
        trainer = Trainer(model, settings, splits, device, rank, world, args.compile, args.fsdp, context)
        start = continue_run(trainer, run, state, changes, say) if state else 0
        say(f"training {model.num_params() / 1e6:.2f}M parameters on {device} ({world} rank{'s' * (world > 1)}), "
            f"{len(splits['train'].tokens):,} train tokens, {trainer.tokens_per_step:,} tokens per step, run folder "
            f"{out}")
        with backend.use_backend(args.kernels):
            model.train()
            stopped = train_loop(trainer, run, tokenizer, start, args, say)
        if not stopped:
            say(f"done: checkpoint in {run.latest() if rank == 0 else out}")
    finish_distributed(world)
    return 0


def context_parallel(args, config, world, device):
    """The ContextParallel of --context-parallel N (None for 1): ranks laid out on a 2-D DeviceMesh (data x context,
    the context dimension innermost: ranks r N to r N + N - 1 share data shard r)."""
    size = args.context_parallel
    if size == 1:
        return None
    if config.block_size % (2 * size):
        raise ValueError(f"--context-parallel {size} zigzag-shards each sequence into {2 * size} pieces: "
                         f"--block-size ({config.block_size}) must be a multiple of {2 * size}")
    if args.cp_method == "all-to-all" and config.n_head % size:
        raise ValueError(f"--cp-method all-to-all gives each rank n_head / {size} heads: --n-head "
                         f"({config.n_head}) must be a multiple of {size}")
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world // size, size), mesh_dim_names=("data", "context"))
    return ContextParallel(mesh["context"].get_group(), mesh.get_local_rank("context"), size, args.cp_method)


def finish_distributed(world):
    if world == 1:
        return
    torch.distributed.barrier()  # let rank 0 finish writing before any rank tears the group down
    torch.distributed.destroy_process_group()
    # Seen here with torch 2.13 and gloo: about one worker in fifteen hung in interpreter shutdown after the group
    # was destroyed and everything was written. Leave directly: nothing is left to flush.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
