"""Writing files so that a reader never sees half of one: write a temporary file beside it, then rename."""
import os


def atomic_write_text(path, text):
    """Replace path's contents with text in one step. The temporary name is per process, so two processes
    writing the same file (ranks of one run, two runs preparing one corpus) never share it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
