"""Memory of importing a Hugging Face LVM folder: `load_lvm` builds the model on the meta device and assigns the
stored tensors shard by shard, so the peak should stay near the model's own size.

    python benchmarks/bench_load.py                   # BENCHMARKS.md "Import memory": 300m, bf16 shards of 200 MB
    python benchmarks/bench_load.py --size tiny --shard 1MB

Writes random weights of SIZE in bf16 with `lvm.hf.save_hf`, then loads them in a fresh process, as float32 and
as stored, and prints the peak growth of resident memory (`ru_maxrss` against the resident size before loading) and
the growth once loaded, against the size of the loaded weights, the reference of the same run. Memory-mapped
weights (kept in their stored dtype) count as resident while their pages are read.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common.options import HelpFormatter
from lvm.checkpoint import load_lvm
from lvm.hf import save_hf
from lvm.model import LVM, LVMConfig


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def measure(folder: str, dtype: str) -> None:
    """In this process: load the folder, print `weights_bytes peak_growth_bytes growth_after_bytes`."""
    before = resident_bytes()
    model = load_lvm(folder, dtype=None if dtype == "stored" else getattr(torch, dtype))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(weights, peak - before, resident_bytes() - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--size", default="300m", help="LVMConfig size")
    parser.add_argument("--shard", default="200MB", help="safetensors shard size")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "DTYPE"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("cpu"):
            model = LVM(LVMConfig.from_name(args.size)).to(torch.bfloat16)
        files = save_hf(model, tmp, max_shard_size=args.shard)
        shards = sorted(Path(files).glob("*.safetensors"))
        del model
        print(f"{args.size}: {len(shards)} bf16 safetensors shards of at most {args.shard}")
        for dtype in ("float32", "stored"):
            done = subprocess.run([sys.executable, __file__, "--measure", tmp, dtype], capture_output=True, text=True,
                                  check=True)
            weights, growth, after = map(int, done.stdout.split())
            print(f"  loaded as {dtype:7s}: weights {weights / 1e9:.2f} GB, peak resident growth {growth / 1e9:.2f} GB "
                  f"({growth / weights:.2f}x the weights), {after / 1e9:.2f} GB once loaded")


if __name__ == "__main__":
    main()
