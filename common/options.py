"""The command-line conventions every `python -m` command shares: `--device` and `--dtype`.

Other shared flags are named alike by convention (docs/ARCHITECTURE.md): `--model` (an LVM checkpoint
or Hugging Face directory), `--tokenizer`, `--sentences`, `--out`.
"""

from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """`--device`, default `cuda` when CUDA is available, else `cpu`."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_dtype_arg(parser: argparse.ArgumentParser, default: str = "bfloat16 on CUDA, else float32") -> None:
    """`--dtype`, one of DTYPES; `default` says in the help what an unset `--dtype` means."""
    parser.add_argument("--dtype", choices=DTYPES, help=f"default: {default}")


def torch_dtype(name: str | None, device: str | None) -> torch.dtype | None:
    """The dtype `--dtype` names; unset, bfloat16 on CUDA and float32 elsewhere, or None (keep the stored
    dtype) for a command without a device."""
    if name is not None:
        return DTYPES[name]
    if device is None:
        return None
    return torch.bfloat16 if device.startswith("cuda") else torch.float32
