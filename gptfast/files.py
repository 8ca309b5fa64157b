"""Files a reader can trust: text replaced in one step (a temporary file beside it, then a rename), and JSON
objects read with errors that name the file."""
import json
import os


def atomic_write_text(path, text):
    """Replace path's contents with text in one step. The temporary name is per process, so two processes
    writing the same file (ranks of one run, two runs preparing one corpus) never share it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json_object(path):
    """The JSON object (a dict) in path. Raises ValueError naming the file when it is not valid JSON or holds
    something other than an object."""
    with open(path) as f:
        text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore the file or copy it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object: it is not the file expected")
    return value
