"""The probe's cache folder: arrays as .npy files (memory-mapped when read) with a json sidecar that says what
made them, so tokens and features are computed once and reused by every later run that asks for the same.

An entry is used only when its sidecar's fingerprint equals the one asked for; anything else (other inputs,
tokenizer, model or depth, or an interrupted write) is recomputed. The array is written under a temporary name
and renamed before its sidecar is written, so a partial array is never taken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_write, commit_file, tmp_path


def module_fingerprint(module: torch.nn.Module, config: dict) -> str:
    """A digest of a module's config and weights that stays cheap for LVM-7B: per tensor its name, shape, dtype,
    and three float64 sums of its values computed where the weights live: plain, squared, and weighted by a ramp
    over their positions, so that values moved within a tensor (a transposed or permuted matrix) change it too.

    Two checkpoints that differ in trained weights differ here; hashing the exact bytes (`weights.module_digest`)
    would cost a 13 GB copy to the host on every run.
    """
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            values = tensor.detach().double().flatten()
            ramp = torch.linspace(1.0, 2.0, values.numel(), dtype=torch.float64, device=values.device)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{values.sum().item()!r}:"
                          f"{values.square().sum().item()!r}:{values.dot(ramp).item()!r}".encode())
    return digest.hexdigest()


class Cache:
    """Named arrays in one folder: `<name>.npy` plus `<name>.json` ({"fingerprint": ..., **meta})."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, name: str, fingerprint: str) -> tuple[np.ndarray, dict] | None:
        """The memory-mapped array and its meta when made with `fingerprint`, else None."""
        try:
            meta = json.loads((self.folder / f"{name}.json").read_text())
            if meta.get("fingerprint") != fingerprint:
                return None
            return np.load(self.folder / f"{name}.npy", mmap_mode="r"), meta
        except (OSError, ValueError):
            return None

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
        """An array on disk to fill in place (features larger than memory), visible only after `commit`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{name}.json").unlink(missing_ok=True)  # the old entry is invalid from here on
        path = tmp_path(self.folder / f"{name}.npy")
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def commit(self, name: str, fingerprint: str, array: np.memmap, meta: dict | None = None) -> None:
        """The array, then its sidecar, each renamed into place once on disk: a crash leaves no entry."""
        array.flush()
        commit_file(self.folder / f"{name}.npy")
        with atomic_write(self.folder / f"{name}.json", "w") as sidecar:
            sidecar.write(json.dumps({"fingerprint": fingerprint, **(meta or {})}) + "\n")

    def write(self, name: str, fingerprint: str, array: np.ndarray, meta: dict | None = None) -> None:
        """Store an array that is already in memory."""
        stored = self.create(name, array.shape, array.dtype)
        stored[:] = array
        self.commit(name, fingerprint, stored, meta)
