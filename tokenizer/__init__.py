"""VQGAN image tokenizer: images <-> 256 tokens from an 8192-code codebook.

    import tokenizer
    tok = tokenizer.load("path/to/checkpoint")   # ours, Lightning .ckpt, open-muse dir, taming .ckpt
    tokens = tok.encode(images)                   # LongTensor[B, tok.tokens_per_image]
    images = tok.decode(tokens)                   # uint8 Tensor[B, 3, S, S]

See docs/tokenizer.md.
"""

from tokenizer.config import VQGANConfig, VQGANConfigError
from tokenizer.loading import TokenizerLoadError, load
from tokenizer.model import VQTokenizer

__all__ = ["VQGANConfig", "VQGANConfigError", "VQTokenizer", "TokenizerLoadError", "load"]
