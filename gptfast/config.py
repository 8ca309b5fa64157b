"""The GPT-2 model's configuration: sizes, dropout, the end-of-text token; checked when built."""
from dataclasses import dataclass


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence: the number of learned positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True  # biases in the Linear layers and LayerNorms, as GPT-2
    dropout: float = 0.0  # on embeddings, residual branches and attention weights (GPT-2's three pdrops)
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int | None = None  # the tokenizer's end-of-text token (GPT-2's BPE: 50256; bytes: none)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.eos_token_id is not None and not (isinstance(self.eos_token_id, int)
                                                  and 0 <= self.eos_token_id < self.vocab_size):
            raise ValueError(f"GPTConfig.eos_token_id must be None or a token id below vocab_size "
                             f"({self.vocab_size}), got {self.eos_token_id!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
