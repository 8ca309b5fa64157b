"""``gptfast train``: train a GPT on gptfast's kernels, on one device or data-parallel under torchrun.

    gptfast train                                   # a small byte-level model on Python's standard library
    gptfast train --data corpus/ --tokenizer gpt2-folder/ --n-layer 12 --n-embd 768
    torchrun --nproc_per_node=2 -m gptfast train    # DDP: NCCL on CUDA, gloo on CPU; rank 0 logs and saves

The run folder (--out) receives log.jsonl (one JSON object per logged step), checkpoint-<iter>/ folders (a
Hugging Face GPT-2 checkpoint plus tokenizer, and train_state.pt with the optimizer, schedule, sampler and RNG
state), and ``latest``, naming the newest complete checkpoint. Checkpoints are written to a temporary folder and
renamed, so none is ever half-written; SIGINT or SIGTERM saves one and exits. --resume continues a run exactly.
"""
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import torch

from gptfast import backend
from gptfast.data import Batches, gptfast_home, prepare
from gptfast.files import atomic_write_text
from gptfast.model import GPT, GPTConfig, next_token_loss, resolve_checkpoint
from gptfast.tokenizer import ByteTokenizer, load_tokenizer

# The default run: about five minutes on a 2-core CPU, after which `gptfast generate` writes recognisable Python.
MODEL_DEFAULTS = dict(n_layer=4, n_head=6, n_embd=192, block_size=256, dropout=0.0)
# Dense bf16 tensor-core peaks (vendor datasheets), for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # --dtype's choices, here and in `gptfast generate`


def add_arguments(parser):
    add = parser.add_argument
    add("--data", help="a text file or a folder of text files (default: Python's standard library sources)")
    add("--tokenizer", help="a folder with a GPT-2 BPE tokenizer (tokenizer.json, or vocab.json and merges.txt); "
                            "default: bytes (vocab 256)")
    add("--out", help="run folder for the log and checkpoints (default: GPTFAST_HOME/runs/<date-time>, where "
                      "`gptfast generate` looks when given no --model)")
    add("--resume", action="store_true", help="continue the run in --out from its latest checkpoint, exactly")
    add("--init-from", help="start from a gptfast or Hugging Face GPT-2 checkpoint folder or hub name (fine-tune)")
    add("--max-iters", type=int, default=2000, help="optimizer steps in all (default 2000)")
    add("--batch-size", type=int, default=8, help="sequences per micro-batch per rank (default 8)")
    add("--block-size", type=int, help=f"sequence length (default {MODEL_DEFAULTS['block_size']})")
    add("--n-layer", type=int, help=f"transformer blocks (default {MODEL_DEFAULTS['n_layer']})")
    add("--n-head", type=int, help=f"attention heads (default {MODEL_DEFAULTS['n_head']})")
    add("--n-embd", type=int, help=f"embedding width (default {MODEL_DEFAULTS['n_embd']})")
    add("--dropout", type=float, help="dropout on embeddings and residual branches (default 0)")
    add("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    add("--min-lr", type=float, help="learning rate at the end of the cosine decay (default lr / 10)")
    add("--warmup-iters", type=int, default=100, help="linear warmup steps (default 100)")
    add("--lr-decay-iters", type=int, help="steps of the cosine decay (default --max-iters)")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay, on matrices only (default 0.1)")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this; 0 disables (default 1)")
    add("--eval-interval", type=int, default=250, help="evaluate and save a checkpoint every N steps (default 250)")
    add("--eval-iters", type=int, default=20, help="batches per loss estimate (default 20)")
    add("--log-interval", type=int, default=10, help="log every N steps (default 10)")
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    add("--dtype", choices=DTYPE_NAMES, default="auto",
        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU); weights stay float32")
    add("--kernels", choices=("auto", "triton", "torch"), default="auto",
        help="triton: gptfast's fused kernels (an error where they cannot run); torch: the plain PyTorch "
             "reference, to compare; auto: the kernels where they run, else PyTorch")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--seed", type=int, default=1337, help="random seed (default 1337)")


def lr_at(step, args):
    """Linear warmup to --lr, then cosine decay to --min-lr over --lr-decay-iters, then flat."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    if step >= args.lr_decay_iters:
        return args.min_lr
    progress = (step - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def make_optimizer(model, args, device):
    """AdamW with weight decay on matrices and embeddings only (not on biases or LayerNorm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def latest_checkpoint(run_folder):
    """The newest complete checkpoint folder of a run folder (what its ``latest`` file names), or None."""
    pointer = os.path.join(run_folder, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(run_folder, f.read().strip())


def dtype_named(name, device):
    """--dtype's value as a torch dtype; auto is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Run:
    """Where a run writes: its folder, log.jsonl and checkpoints (rank 0 only)."""

    def __init__(self, folder, writer):
        self.folder, self.writer = folder, writer
        if writer:
            os.makedirs(folder, exist_ok=True)

    def log(self, record):
        if self.writer:
            with open(os.path.join(self.folder, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, model, tokenizer, state):
        """Writes checkpoint-<iter> through a temporary folder and a rename, then points ``latest`` at it and
        removes the older checkpoints."""
        if not self.writer:
            return
        name = f"checkpoint-{state['iter']}"
        tmp = os.path.join(self.folder, f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        torch.save(state, os.path.join(tmp, "train_state.pt"))
        final = os.path.join(self.folder, name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(self.folder, "latest"), name)
        for old in os.listdir(self.folder):
            if old.startswith("checkpoint-") and old != name:
                shutil.rmtree(os.path.join(self.folder, old), ignore_errors=True)


def load_train_state(checkpoint):
    try:
        return torch.load(os.path.join(checkpoint, "train_state.pt"), map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"gptfast train: the checkpoint {checkpoint} is corrupt or incomplete ({error}); "
                         "delete it, or start a new run with another --out") from error


def model_config(args, resumed_config, tokenizer):
    """The GPTConfig from the flags, or the resumed one (refusing flags that contradict it)."""
    flags = {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd, "block_size": args.block_size,
             "dropout": args.dropout}
    if resumed_config is not None:
        for name, value in flags.items():
            if value is not None and value != resumed_config[name]:
                raise SystemExit(f"gptfast train: the run being resumed has {name}={resumed_config[name]}, but "
                                 f"--{name.replace('_', '-')} {value} was given; drop the flag or use a new --out")
        return GPTConfig(**resumed_config)
    values = {name: MODEL_DEFAULTS[name] if value is None else value for name, value in flags.items()}
    return GPTConfig(vocab_size=tokenizer.vocab_size, **values)


def setup_distributed(device_arg):
    """(rank, world_size, device). Under torchrun (RANK set) joins the process group: NCCL on CUDA, else gloo."""
    cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda") or device_arg.startswith("cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(("cuda" if cuda else "cpu") if device_arg == "auto" else device_arg)
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def main(args):
    for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        if getattr(args, name) < 1:
            raise SystemExit(f"gptfast train: --{name.replace('_', '-')} must be at least 1")
    if args.resume and args.out is None:
        raise SystemExit("gptfast train: --resume needs --out, the run folder to continue")
    if args.resume and args.init_from:
        raise SystemExit("gptfast train: --resume and --init-from exclude each other")
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.lr_decay_iters = args.max_iters if args.lr_decay_iters is None else args.lr_decay_iters
    rank, world, device = setup_distributed(args.device)
    out = args.out or os.path.join(gptfast_home(), "runs", time.strftime("%Y%m%d-%H%M%S"))
    run = Run(out, writer=rank == 0)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    torch.manual_seed(args.seed + rank)

    # Tokenizer and model: resumed, fine-tuned from a checkpoint, or new.
    state, checkpoint = None, None
    if args.resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise SystemExit(f"gptfast train: --resume: {out} holds no checkpoint (no 'latest' file)")
        state = load_train_state(checkpoint)
        tokenizer = load_tokenizer(checkpoint)
    elif args.init_from:
        checkpoint = resolve_checkpoint(args.init_from)
        tokenizer = load_tokenizer(args.tokenizer or checkpoint)
    else:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else ByteTokenizer()
    if args.init_from:
        model = GPT.from_pretrained(checkpoint)
        if args.block_size and args.block_size > model.config.block_size:
            raise SystemExit(f"gptfast train: --block-size {args.block_size} exceeds the checkpoint's "
                             f"{model.config.block_size}")
        block_size = args.block_size or model.config.block_size
    else:
        config = model_config(args, state and state["config"], tokenizer)
        model = GPT(config)
        if state is not None:
            model.load_hf_state_dict(_load_checkpoint_weights(checkpoint))
        block_size = config.block_size
    model.to(device)
    tokenizer_name = "bytes" if isinstance(tokenizer, ByteTokenizer) else os.path.abspath(tokenizer.folder)

    # Rank 0 tokenizes into the shared cache first; the others then read it (no two writers on one file).
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    splits = prepare(args.data, tokenizer, tokenizer_name, progress=rank == 0)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    batches = Batches(splits["train"], args.batch_size, block_size, seed=args.seed + rank, shard=(rank, world))
    optimizer = make_optimizer(model, args, device)
    start = 0
    if state is not None:
        if len(state["batches_rng"]) != world:
            raise SystemExit(f"gptfast train: the run was saved with {len(state['batches_rng'])} ranks; resume it "
                             f"with the same number (now {world}) to continue it exactly")
        optimizer.load_state_dict(state["optimizer"])
        batches.generator.set_state(state["batches_rng"][rank])
        torch.set_rng_state(state["torch_rng"])
        start = state["iter"]
        say(f"resuming {out} at step {start}")

    train_model = torch.compile(model) if args.compile else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = dtype_named(args.dtype, device)

    def autocast():  # a fresh context each use; float32 runs without autocast
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def save(step):
        rng = [batches.generator.get_state()]
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, rng[0])
            rng = gathered
        run.save(model, tokenizer, {"iter": step, "optimizer": optimizer.state_dict(), "batches_rng": rng,
                                    "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(model.config)})

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        losses = {}
        for name, tokens in splits.items():
            if len(tokens) < block_size + 2:
                continue
            sampler = Batches(tokens, args.batch_size, block_size, seed=args.seed + 999)  # the same batches each time
            total = 0.0
            for _ in range(args.eval_iters):
                x, y = sampler.next(device)
                with autocast():
                    total += next_token_loss(model(x), y).item()
            losses[name] = total / args.eval_iters
        model.train()
        return losses

    flops_per_token = 6 * model.num_params() + 12 * model.config.n_layer * model.config.n_embd * block_size
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda"
                 and k in torch.cuda.get_device_name(device)), None)
    tokens_per_step = args.batch_size * block_size * args.grad_accum * world
    say(f"training {model.num_params() / 1e6:.2f}M parameters on {device} ({world} rank{'s' * (world > 1)}), "
        f"{len(splits['train']):,} train tokens, {tokens_per_step:,} tokens per step, run folder {out}")
    stop = {"signal": None}
    # Until training ends, a signal only asks the loop to save and stop; the old handlers come back afterwards.
    previous = {sig: signal.signal(sig, lambda number, frame: stop.update(signal=number))
                for sig in (signal.SIGINT, signal.SIGTERM)}

    try:
        with backend.use_backend(args.kernels):
            model.train()
            step, last_step, last = start, start, time.perf_counter()
            while step < args.max_iters:
                if _any_rank(stop["signal"] is not None, world, device):
                    save(step)
                    say(f"\nstopped by signal at step {step}: checkpoint saved in {out}; continue with "
                        f"`gptfast train --resume --out {out}`")
                    return 0
                lr = lr_at(step, args)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for micro in range(args.grad_accum):
                    x, y = batches.next(device)
                    sync = nullcontext() if world == 1 or micro == args.grad_accum - 1 else train_model.no_sync()
                    with sync, autocast():
                        loss = next_token_loss(train_model(x), y) / args.grad_accum
                    scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                if args.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                evaluate = step % args.eval_interval == 0 or step == args.max_iters
                if step % args.log_interval == 0 or evaluate:
                    train_loss = loss_sum.item()
                    now = time.perf_counter()
                    seconds = (now - last) / (step - last_step)
                    last, last_step = now, step
                    record = {"iter": step, "train_loss": train_loss, "lr": lr, "ms_per_iter": 1000 * seconds,
                              "tokens_per_s": tokens_per_step / seconds}
                    line = (f"step {step}/{args.max_iters}  loss {train_loss:.4f}  lr {lr:.2e}  "
                            f"{1000 * seconds:.1f} ms/step  {tokens_per_step / seconds:,.0f} tok/s")
                    if peak:
                        record["mfu"] = flops_per_token * tokens_per_step / seconds / (peak * world)
                        line += f"  MFU {100 * record['mfu']:.1f}%"
                    if evaluate:
                        losses = estimate_loss()
                        record.update({f"eval_{k}_loss": v for k, v in losses.items()})
                        if "val" in losses:
                            record["val_loss"] = losses["val"]
                        line += "  eval " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items())
                        last = time.perf_counter()  # evaluation time is not training time
                    run.log(record)
                    say(line)
                if evaluate:
                    save(step)
        if world > 1:
            torch.distributed.barrier()  # let rank 0 finish writing before any rank tears the group down
            torch.distributed.destroy_process_group()
        say(f"done: checkpoint in {latest_checkpoint(out) if rank == 0 else out}")
        if world > 1:
            # Seen here with torch 2.13 and gloo: about one worker in fifteen hung in interpreter shutdown after
            # the group was destroyed and everything was written. Leave directly: nothing is left to flush.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _load_checkpoint_weights(checkpoint):
    from gptfast.model import load_weights
    try:
        return load_weights(checkpoint)
    except Exception as error:
        raise SystemExit(f"gptfast train: the checkpoint {checkpoint} is corrupt or incomplete ({error}); "
                         "delete it, or start a new run with another --out") from error


def _any_rank(flag, world, device):
    """True on every rank when any rank's flag is set, so all ranks stop at the same step."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())

