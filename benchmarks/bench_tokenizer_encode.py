"""Encoding throughput of the released-LVM-shaped VQGAN encoder against its FLOP limit.

    python benchmarks/bench_tokenizer_encode.py                       # CUDA: bf16 autocast, channels_last, batch 64/128/256
    python benchmarks/bench_tokenizer_encode.py --batch-sizes 2 --iters 2   # CPU smoke figure
    python benchmarks/bench_tokenizer_encode.py --tiny --batch-sizes 1 --iters 1   # smoke run, tiny tokenizer

Random weights in the released shape (open-muse VQGANModel: 128 x [1,2,2,4,6], 2 blocks,
no attention, z 64, 8192 codes). The timed region is `tok.encode_pixels` on a batch
already on the device: encoder + quant_conv + float32 nearest-code search (preprocessing
and host->device copies are the tokenize pipeline's business and measured there).
FLOPs per image are counted with torch.utils.flop_counter on that same call; the limit
is peak_tflops / GFLOP-per-image, and the ratio is measured/limit.
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from common.files import json_text, write_atomic
from common.options import HelpFormatter
from lvm.peaks import dense_bf16_peak
from tokenizer import VQGANConfig, VQTokenizer

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vqgan_tiny.yaml"


def flops_per_image(tok: VQTokenizer) -> float:
    """FLOPs of one `encode_pixels` call on a single image (convs + matmuls, 2 per multiply-add)."""
    x = torch.zeros(1, 3, tok.image_size, tok.image_size, device=tok.device)
    counter = FlopCounterMode(display=False)
    with counter:
        tok.encode_pixels(x)
    return float(counter.get_total_flops())


def time_encode(tok: VQTokenizer, batch: int, iters: int, warmup: int, autocast: bool) -> float:
    """Images per second of `encode_pixels` at this batch size (best of `iters` timed calls)."""
    device = tok.device
    x = torch.rand(batch, 3, tok.image_size, tok.image_size, device=device).contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    with ctx:
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            tok.encode_pixels(x)
            sync()
            if i >= warmup:
                best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--batch-sizes", default="64,128,256" if cuda else "2")
    parser.add_argument("--iters", type=int, default=10 if cuda else 2)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32", help="bf16 = autocast")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the ratio (default: datasheet bf16 for known GPUs)")
    parser.add_argument("--json", default=None, help="also write results here")
    parser.add_argument("--tiny", action="store_true", help="the tiny tokenizer (configs/vqgan_tiny.yaml), for smoke runs")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = VQGANConfig(**OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model.init_args.tokenizer)) if args.tiny else VQGANConfig()
    tok = VQTokenizer(config).to(device).eval()  # default: the released LVM tokenizer's shape
    if not args.no_channels_last:
        tok = tok.to(memory_format=torch.channels_last)
    gflop = flops_per_image(tok) / 1e9
    if args.compile:
        tok.encoder = torch.compile(tok.encoder)
    peak = args.peak_tflops or (dense_bf16_peak(device) or 0) / 1e12
    limit = peak * 1e3 / gflop if peak else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    print(f"device {name}; encoder {gflop:.1f} GFLOP/image; dtype {args.dtype}; channels_last {not args.no_channels_last}; compile {args.compile}")
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rate = time_encode(tok, batch, args.iters, args.warmup, autocast=args.dtype == "bf16")
        achieved = rate * gflop / 1e3
        line = f"batch {batch}: {rate:.1f} images/s, {achieved:.2f} TFLOP/s"
        if limit:
            line += f"; limit {limit:.0f} images/s at {peak:.0f} TFLOP/s -> {100 * rate / limit:.1f}% of limit"
        print(line)
        rows.append({"batch": batch, "images_per_s": rate, "tflops": achieved, "limit_images_per_s": limit})
        if args.json:  # after every row: a run cut by its time limit keeps what it measured
            write_atomic(args.json, json_text({"device": name, "gflop_per_image": gflop, "dtype": args.dtype, "rows": rows}))


if __name__ == "__main__":
    main()
