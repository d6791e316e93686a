"""VQGAN image tokenizer: images <-> 256 tokens from an 8192-code codebook.

    import tokenizer
    tok = tokenizer.load("path/to/checkpoint")   # ours, Lightning .ckpt, open-muse dir, taming .ckpt
    tokens = tok.encode(images)                   # LongTensor[B, tok.tokens_per_image]
    images = tok.decode(tokens)                   # uint8 Tensor[B, 3, S, S]

See docs/tokenizer.md.
"""

from common.errors import interrupt_quietly_when_started_as_a_command

interrupt_quietly_when_started_as_a_command()  # first, before torch loads

from tokenizer.config import VQGANConfig, VQGANConfigError  # noqa: E402
from tokenizer.loading import TokenizerLoadError, load  # noqa: E402
from tokenizer.model import VQTokenizer  # noqa: E402

__all__ = ["VQGANConfig", "VQGANConfigError", "VQTokenizer", "TokenizerLoadError", "load"]
