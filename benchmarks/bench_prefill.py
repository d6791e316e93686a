"""A prompt's candidates share one prefill: C identical rows against one row (the floor) and C different rows
(what identical rows cost before they shared it).

    python benchmarks/bench_prefill.py                     # 300m, 8 candidates, a 2-frame prompt (513 tokens), CPU
    python benchmarks/bench_prefill.py --device cuda --size 1b --frames 15

Times `Decoder.generate(prompt, 1)` from an empty cache (the prefill and one sampled token), best of `--repeats`.
"""

from __future__ import annotations

import argparse
import time

import torch

from common.options import HelpFormatter
from common.vocab import BOS_ID, CODEBOOK_SIZE
from lvm.generate import Decoder
from lvm.model import LVM, LVMConfig


def prefill_seconds(model: LVM, rows: torch.Tensor, repeats: int) -> float:
    times = []
    with Decoder(model, len(rows), rows.shape[1] + 1) as decoder:
        for _ in range(repeats):
            decoder.cached = decoder.cached[:, :0]  # nothing reusable: a whole prefill each time
            if rows.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            decoder.generate(rows, 1)
            if rows.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--size", default="300m")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--frames", type=int, default=2, help="prompt frames of 256 tokens, after BOS")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = LVM(LVMConfig.from_name(args.size)).to(dtype).eval()
    one = torch.cat([torch.tensor([[BOS_ID]]), torch.randint(0, CODEBOOK_SIZE, (1, 256 * args.frames))], 1).to(device)
    different = torch.cat([one[:, :1].expand(args.candidates, 1),
                           torch.randint(0, CODEBOOK_SIZE, (args.candidates, one.shape[1] - 1), device=device)], 1)
    floor = prefill_seconds(model, one, args.repeats)
    shared = prefill_seconds(model, one.expand(args.candidates, -1).contiguous(), args.repeats)
    separate = prefill_seconds(model, different, args.repeats)
    print(f"{args.size}, {one.shape[1]} prompt tokens, {args.candidates} candidates, {device}, {dtype}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}:")
    print(f"  one row (the floor)          {floor:8.2f} s")
    print(f"  {args.candidates} identical rows (shared)  {shared:8.2f} s  ({shared / floor:.2f}x the floor)")
    print(f"  {args.candidates} different rows           {separate:8.2f} s  ({separate / floor:.2f}x the floor)")


if __name__ == "__main__":
    main()
