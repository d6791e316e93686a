"""Which weights a module holds, as one short string: what token shards, annotation maps, sentence shards
and checkpoints record about the model that made them."""

from __future__ import annotations

import hashlib

import torch


def module_digest(module: torch.nn.Module) -> str:
    """blake2b of every parameter and buffer (names and bytes), whatever file format or path the module was
    loaded from. Shapes and dtypes are not hashed (that would change every recorded digest): the records that
    carry a digest also carry the config that fixes them, and with it, equal digests mean equal weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
