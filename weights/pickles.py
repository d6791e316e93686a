"""Reading PyTorch pickles as data: `torch.load(weights_only=True)` and nothing else.

A `.ckpt` or `.bin` is a pickle, and a pickle can name any Python callable to run while it loads (the
classic malicious checkpoint). `weights_only=True` lets through only tensors, numbers, strings and plain
containers, which is all our checkpoints hold (Lightning's included); anything else is refused with the
global it names, before it is called.
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from weights.errors import WeightsError

_OLD_LIGHTNING_CALLBACK_KEYS = [
    (type(name.rpartition(".")[2], (), {"__doc__": "An inert stand-in, never the class itself."}), name)
    for name in ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                 "pytorch_lightning.callbacks.early_stopping.EarlyStopping")
]
"""PyTorch Lightning before 1.5 (taming-transformers' released VQGANs: 1.0) keyed each callback's state by the
callback's class, so those checkpoints name these classes. They are read as names of inert stand-in classes: nothing
is imported or run, and the callback states are never used."""


def torch_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)`; every failure is one `WeightsError` line naming the file."""
    if not Path(path).is_file():
        raise WeightsError(path, "no such file")
    if is_lfs_pointer(path):
        raise WeightsError(path, LFS_POINTER)
    mmap = mmap and zipfile.is_zipfile(path)  # files saved before torch 1.6's zip format load, but cannot be mapped
    try:
        with torch.serialization.safe_globals(_OLD_LIGHTNING_CALLBACK_KEYS):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except PermissionError:
        raise WeightsError(path, "permission denied") from None
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"GLOBAL (\S+)", str(err))
        if unsafe is None:
            raise WeightsError(path, "corrupt or not a PyTorch checkpoint (unpickling failed)") from None
        raise WeightsError(
            path,
            f"refused: it pickles {unsafe.group(1)}, which is code, not weights (only tensors and plain data are "
            "read); re-save its state_dict from a trusted environment",
        ) from None
    # TypeError: a pickle that calls one of the stand-ins above with arguments; KeyError, IndexError: text or random
    # bytes, which the legacy unpickler reads as memo lookups (a file starting with "h" is BINGET)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, TypeError, struct.error, KeyError,
            IndexError) as err:
        raise WeightsError(path, f"corrupt or not a PyTorch checkpoint ({type(err).__name__})") from None


LFS_POINTER = "a git-lfs pointer, not the weights: run `git lfs pull` in its repository (or use the hub id)"


def is_lfs_pointer(path: str | Path) -> bool:
    """Whether a weights file is git-lfs's small text stand-in for it, what a model repository cloned without git-lfs
    holds: the most common way a copied model folder is broken."""
    with open(path, "rb") as file:
        return file.read(len(b"version https://git-lfs")) == b"version https://git-lfs"
