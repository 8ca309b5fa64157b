"""A Hugging Face GPT-2 checkpoint folder as gptfast reads and writes it: config.json, model.safetensors (or the
older pytorch_model.bin) and the tokenizer's files. Finding one (a local folder, or a hub name from the Hugging
Face cache or the hub), reading its config and weights with errors that name the file, writing one file by file
atomically; and the format itself, which weight is which (names and transposes) and the config's fields.
"""
import json
import os
import re
import warnings

import torch

from gptfast.config import GPTConfig
from gptfast.files import atomic_write_text, read_json_object

# GPT-2's checkpoints store these weights as Conv1D, (in, out): the transpose of our Linear's.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_FILES = ["config.json", "*.safetensors", "tokenizer.json", "vocab.json", "merges.txt"]
HUB_NAME = re.compile(r"[A-Za-z0-9_-][\w.-]*(/[\w.-]+)?")  # "gpt2", "openai-community/gpt2"


def resolve(name_or_path):
    """The local folder of a checkpoint: name_or_path itself, or the snapshot of a hub name (from the Hugging
    Face cache, else downloaded). Raises FileNotFoundError saying what to do."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError(f"{name_or_path} has no config.json: it is not a GPT-2 checkpoint folder")
        return name_or_path
    if os.path.exists(name_or_path) or not HUB_NAME.fullmatch(name_or_path):
        raise FileNotFoundError(f"{name_or_path} is not a checkpoint folder (config.json and model.safetensors)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name_or_path} is not a folder here, and loading it from the Hugging Face hub "
                                "needs huggingface_hub (pip install 'gptfast[hf]')") from None
    try:
        return snapshot_download(name_or_path, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception:  # not cached: try the hub
        pass
    try:
        return snapshot_download(name_or_path, allow_patterns=HUB_FILES)
    except Exception as error:  # offline, unknown name, no access: one line, not the hub client's traceback
        raise FileNotFoundError(
            f"{name_or_path} is not a folder here nor in the Hugging Face cache, and the hub could not serve it "
            f"({type(error).__name__}). On a machine with internet run `hf download {name_or_path} --local-dir "
            f"{os.path.basename(name_or_path)}`, copy that folder here and pass its path") from None


def read_config(folder):
    """The GPTConfig of a checkpoint folder's config.json."""
    path = os.path.join(folder, "config.json")
    return config_from_hf(read_json_object(path), source=path)


def load_weights(folder):
    """The state_dict in folder's model.safetensors, or pytorch_model.bin loaded with weights_only=True (never
    unpickling arbitrary objects). A damaged file raises ValueError naming it."""
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        path = os.path.join(folder, "pytorch_model.bin")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is corrupt or incomplete ({str(error).splitlines()[0]}); copy or write the "
                         "checkpoint again") from None


def load_state(model, folder):
    """Copy a checkpoint folder's weights into model, naming the folder when they do not fit its config."""
    weights = load_weights(folder)
    try:
        load_hf_state_dict(model, weights)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from None


def save(model, folder, state_dict=None):
    """Writes config.json and model.safetensors in Hugging Face's GPT-2 format, each atomically. state_dict: the
    model's whole weights where model.state_dict() would give shards (FSDP)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(os.path.join(folder, "config.json"), json.dumps(config_to_hf(model.config), indent=2))
    tmp = os.path.join(folder, f"model.safetensors.{os.getpid()}.tmp")
    weights = hf_state_dict(model.state_dict() if state_dict is None else state_dict)
    save_file({k: v.detach().cpu() for k, v in weights.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))


def load_hf_state_dict(model, hf_state):
    """Copy a transformers GPT2LMHeadModel state_dict into a GPT. The mapping is explicit: every name is ours with
    an optional 'transformer.' prefix; the HF_TRANSPOSED weights need a transpose."""
    ours = model.state_dict()
    theirs = {}
    for name, tensor in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        key = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        theirs[key] = tensor.t() if key.endswith(HF_TRANSPOSED) else tensor
    theirs.setdefault("lm_head.weight", theirs.get("transformer.wte.weight"))
    missing = sorted(k for k in ours if theirs.get(k) is None)
    unexpected = sorted(k for k in theirs if k not in ours)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the GPT-2 layout: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for key, tensor in ours.items():
        if theirs[key].shape != tensor.shape:
            raise ValueError(f"checkpoint weight {key} has shape {tuple(theirs[key].shape)}, the config "
                             f"needs {tuple(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in ours.items():
            tensor.copy_(theirs[key])

def hf_state_dict(state_dict):
    """A GPT's state_dict under transformers GPT2LMHeadModel's names and layouts."""
    return {name: (t.t() if name.endswith(HF_TRANSPOSED) else t).contiguous()
            for name, t in state_dict.items() if name != "lm_head.weight"}


def config_from_hf(hf_config, source="config.json"):
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type is {hf_config.get('model_type')!r}, only 'gpt2' is supported")
    try:
        return GPTConfig(vocab_size=hf_config["vocab_size"], block_size=hf_config["n_positions"],
                         n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"],
                         layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5), bias=True,
                         eos_token_id=_checkpoint_eos(hf_config, source))
    except KeyError as error:
        raise ValueError(f"{source} lacks {error.args[0]!r}") from None
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _checkpoint_eos(hf_config, source):
    """The checkpoint's eos_token_id, or None where it names no token of the vocabulary: transformers' GPT2Config
    keeps GPT-2's 50256 as its default bos/eos whatever vocab_size is, and transformers loads such a folder. (A
    GPTConfig built by hand with such an id is still refused.)"""
    eos, vocab_size = hf_config.get("eos_token_id"), hf_config.get("vocab_size")
    if isinstance(eos, int) and isinstance(vocab_size, int) and not 0 <= eos < vocab_size:
        warnings.warn(f"{source}: eos_token_id {eos} is not a token id below vocab_size ({vocab_size}), as "
                      f"transformers' GPT2Config default leaves it for small vocabularies; loaded as no "
                      f"end-of-text token")
        return None
    return eos


def config_to_hf(config):
    if not config.bias:
        raise ValueError("a model without biases has no Hugging Face GPT-2 equivalent")
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_embd": config.n_embd, "layer_norm_epsilon": config.layer_norm_epsilon,
            "activation_function": "gelu_new", "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout, "tie_word_embeddings": True,
            # GPT-2 begins and ends text with one token; null where the tokenizer has none (bytes).
            "bos_token_id": config.eos_token_id, "eos_token_id": config.eos_token_id}
