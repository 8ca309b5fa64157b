"""A training run's folder, written by one `gptfast train` at a time:

    RUN/.lock            held (fcntl.flock) by the process writing the run; holds its pid
    RUN/log.jsonl        one JSON object per logged step, and one per resume; on --resume it is cut back to the
                         resumed step first, so every step appears once
    RUN/checkpoint-N/    the run after N steps: a Hugging Face GPT-2 folder (gptfast.checkpoint), its tokenizer,
                         and train_state.pt (optimizer, schedule position, random states, the run's settings)
    RUN/latest           the name of the newest complete checkpoint

A save writes the new checkpoint under a temporary name, renames it into place, switches `latest` to it in one
atomic rename, and only then deletes older checkpoints: however the process is stopped, `latest` names a complete
checkpoint.
"""
import fcntl
import glob
import json
import os
import shutil

import torch

from gptfast import checkpoint
from gptfast.files import atomic_write_text

LOCK, LOG, LATEST, TRAIN_STATE = ".lock", "log.jsonl", "latest", "train_state.pt"


class RunInUse(OSError):
    """Another process holds the run folder's lock."""


def latest_name(run_folder):
    """What run_folder's `latest` says, or None when it has no `latest` file."""
    pointer = os.path.join(run_folder, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip()


def latest_checkpoint(run_folder):
    """The checkpoint folder that run_folder's `latest` names, or None when there is no `latest` file."""
    name = latest_name(run_folder)
    if name is None:
        return None
    folder = os.path.join(run_folder, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{os.path.join(run_folder, LATEST)} names {name!r}, which is not in {run_folder}: "
                                "the run folder was changed by hand; point `latest` at a checkpoint-N folder there, "
                                "or remove the run")
    return folder


def newest_run_checkpoint(runs_folder):
    """The latest checkpoint of the most recently saved run under runs_folder."""
    pointers = glob.glob(os.path.join(runs_folder, "*", LATEST))
    if not pointers:
        raise FileNotFoundError(f"no --model given and no run of `gptfast train` under {runs_folder}; train one "
                                "first, or pass --model")
    return latest_checkpoint(os.path.dirname(max(pointers, key=os.path.getmtime)))


def load_train_state(checkpoint_folder):
    path = os.path.join(checkpoint_folder, TRAIN_STATE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is corrupt or incomplete ({str(error).splitlines()[0]}); start a new run with "
                         f"another --out (--init-from {checkpoint_folder} keeps the weights if they load)") from None


class RunFolder:
    """A run folder as its writer sees it. Use it as a context manager: entering takes the lock (writer only),
    leaving releases it. Non-writers (ranks other than 0) read through it and write nothing."""

    def __init__(self, folder, writer=True):
        self.folder, self.writer = folder, writer
        self._lock_file = None

    def __enter__(self):
        if self.writer:
            self._lock()
        return self

    def __exit__(self, *exc):
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the lock
            self._lock_file = None

    def _lock(self):
        os.makedirs(self.folder, exist_ok=True)
        lock_file = open(os.path.join(self.folder, LOCK), "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise RunInUse(f"{self.folder} is in use by another `gptfast train` (pid {holder}); wait for it to "
                           "end, or give another --out") from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._lock_file = lock_file

    def latest(self):
        return latest_checkpoint(self.folder)

    def log(self, record):
        if self.writer:
            with open(os.path.join(self.folder, LOG), "a") as f:
                f.write(json.dumps(record) + "\n")

    def cut_log(self, step):
        """Drop the records of steps after `step` (logged before a stop that saved nothing), and any line a kill
        left half-written, so that a resumed run logs each step once."""
        path = os.path.join(self.folder, LOG)
        if not self.writer or not os.path.isfile(path):
            return
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("iter", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write_text(path, "".join(kept))

    def save(self, model, tokenizer, train_state, weights=None):
        """Writes checkpoint-<iter> (see the module docstring for the order): model's config and weights (or the
        whole state_dict weights, for a sharded model), the tokenizer and train_state. A save at the step `latest`
        already names does nothing: no step has run since, so that checkpoint holds this state."""
        if not self.writer:
            return
        name = f"checkpoint-{train_state['iter']}"
        if latest_name(self.folder) == name:
            return
        tmp = os.path.join(self.folder, f".{name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoint.save(model, tmp, weights)
        tokenizer.save(tmp)
        torch.save(train_state, os.path.join(tmp, TRAIN_STATE))
        final = os.path.join(self.folder, name)
        shutil.rmtree(final, ignore_errors=True)  # complete, but left unnamed by a save stopped before its switch
        os.replace(tmp, final)
        atomic_write_text(os.path.join(self.folder, LATEST), name)
        self._remove_all_but(name)

    def _remove_all_but(self, name):
        """Older checkpoints, and what stopped saves left (temporary folders and files)."""
        for entry in os.listdir(self.folder):
            path = os.path.join(self.folder, entry)
            if entry.startswith("checkpoint-") and entry != name or entry.endswith(".tmp"):
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
