"""The command-line conventions every `python -m` command shares: `--help` showing defaults (`HelpFormatter`),
`--device` (checked here), count flags (`at_least`), `--dtype`, and `--model` / `--tokenizer` where they default
to the release's weights.

Other shared flags are named alike by convention (docs/ARCHITECTURE.md): `--sentences`, `--out`. The
release's hub ids live in `weights` (a layer above this one), so commands pass them in as defaults.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from collections.abc import Callable, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's `--help`: the description as written, and each flag's default after its help unless the
    help says it already, so that what an unset flag does needs no trip to the docs."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ((), [], argparse.SUPPRESS)
        if not action.option_strings or unset or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def usable_cores() -> int:
    """The cores this process may run on: a Slurm task's `--cpus-per-task`, not the node's count (where the system
    cannot say, as on macOS, all of them)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def default_workers() -> int:
    """Decoding processes per rank when none are asked for: one per usable core, at most 8."""
    return min(8, usable_cores())


def decoding_start_method(workers: int) -> str | None:
    """How the decoding workers of tokenize, annotate and probe start: from a fork server, never forked from the
    command's process. FFmpeg (PyAV) keeps thread pools between calls; a fork copies a live pool's condition variables
    with waiters that do not exist in the child, and the child's first frame conversion then blocks forever in
    pthread_cond_destroy. That happened to a process that had decoded video itself (`--workers 0`, or an earlier
    call of the same function) and then forked workers. None where there are no workers (the DataLoader's rule) or
    no fork server (Windows)."""
    return "forkserver" if workers > 0 and "forkserver" in multiprocessing.get_all_start_methods() else None


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type` for a count flag: an integer >= `minimum`, so that `--batch-size 0` is a usage
    error rather than a traceback (or, worse, a silent "no limit") deep inside the command."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum of {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # how argparse names the type in its messages
    return parse


SEEDS = 2**32
"""Seeds are below 2**32: what Lightning's seed_everything and numpy's legacy generator take (torch's to 2**64)."""


def parse_seed(text: str) -> int:
    """An argparse `type` for `--seed`: an integer every seeded library takes, so that `--seed -1` is a usage error
    rather than a traceback once the expensive part (a model loaded, features computed) is done."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < SEEDS:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 2**32)")
    return value


def names_of(choices: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse `type` for a comma-separated list of `choices` (`--tasks edges,depth`): at least one, each known,
    returned in the order of `choices` without repeats."""

    def parse(text: str) -> tuple[str, ...]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = sorted(set(names) - set(choices))
        if unknown or not names:
            problem = f"unknown {what} {', '.join(unknown)}" if unknown else f"no {what} given"
            raise argparse.ArgumentTypeError(f"{problem} (choose from {', '.join(choices)})")
        return tuple(name for name in choices if name in names)

    parse.__name__ = f"list of {what}s"
    return parse


def parse_device(text: str) -> str:
    """An argparse `type` for `--device`: a device torch knows and this machine has, so that a typo or a
    missing GPU is a usage error here rather than a traceback from the first tensor moved there."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N, mps, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """`--device`, default `cuda` when CUDA is available, else `cpu`."""
    parser.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:N, mps (default: cuda when CUDA is available, else cpu)")


def add_rank_device_arg(parser: argparse.ArgumentParser) -> None:
    """`--device` of the commands that run one process per GPU (torchrun, Slurm): unset, each rank picks
    its own (`common.ranks.pick_device`)."""
    parser.add_argument("--device", type=parse_device, default=None,
                        help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")


def add_dtype_arg(parser: argparse.ArgumentParser, default: str = "bfloat16 on CUDA, else float32") -> None:
    """`--dtype`, one of DTYPES; `default` says in the help what an unset `--dtype` means."""
    parser.add_argument("--dtype", choices=DTYPES, help=f"default: {default}")


def add_model_arg(parser: argparse.ArgumentParser, default: str | None) -> None:
    """`--model`: our Lightning `.ckpt`, a Hugging Face Llama folder or a hub id (`weights.resolve` reads each);
    required when `default` is None."""
    what = "our Lightning .ckpt, a Hugging Face Llama folder or hub id"
    if default is None:
        parser.add_argument("--model", required=True, help=what)
    else:
        parser.add_argument("--model", default=default, help=f"{what} (default: {default})")


def add_tokenizer_arg(parser: argparse.ArgumentParser, default: str | None, unset: str | None = None) -> None:
    """`--tokenizer`: anything `tokenizer.load` reads, a hub id included; `unset` says in the help what no
    `--tokenizer` means when `default` is None."""
    parser.add_argument("--tokenizer", default=default,
                        help=f"anything tokenizer.load reads: a checkpoint, folder or hub id (default: {unset or default})")


def torch_dtype(name: str | None, device: str | None) -> torch.dtype | None:
    """The dtype `--dtype` names; unset, bfloat16 on CUDA and float32 elsewhere, or None (keep the stored
    dtype) for a command without a device."""
    if name is not None:
        return DTYPES[name]
    if device is None:
        return None
    return torch.bfloat16 if device.startswith("cuda") else torch.float32
