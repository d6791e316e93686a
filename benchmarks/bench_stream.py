"""Packed tokens/s from sentences.stream.PackedStream through a DataLoader, against what training consumes; and
how long a resume takes to its first batch.

    python benchmarks/bench_stream.py                       # synthetic shards, 2 workers, seq_len 4096
    python benchmarks/bench_stream.py --shards sentences/   # your own sentence shards

Synthetic shards mimic a built mixture: sentences of 1, 2, 6, 8 and 16 images of 256 tokens plus BOS/EOS,
1000 per shard, with index.json and lengths.npy. The figure is input tokens delivered per second over one
epoch, counted from the first batch (worker start-up is reported separately). The anchor is ~50,000 tokens/s,
what one GPU consumes training the 1B model.

The resume figure is one reader's time to its first batch when resumed at ``--resume-at`` of its epoch: from the
sentence lengths (lengths.npy), and, for synthetic shards, again without them (re-reading the epoch so far,
what a resume of shards without lengths.npy does), as the anchor.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.files import expand_shards
from common.options import HelpFormatter
from common.vocab import BOS_ID, EOS_ID, TOKENS_PER_IMAGE
from sentences.formats import LENGTHS_NAME, has_lengths, tar_writer, write_lengths
from sentences.stream import PackedStream

GPU_TOKENS_PER_S = 50_000  # one GPU training the 1B model (issue 4)


def write_synthetic(folder: Path, tokens: int, per_shard: int = 1000, seed: int = 0) -> None:
    """Sentence shards holding about ``tokens`` tokens, plus the index.json and lengths.npy the stream reads."""
    rng = np.random.default_rng(seed)
    shards, written, k, every = {}, 0, 0, []
    while written < tokens:
        path = folder / f"sentences-{k:06d}.tar"
        lengths = rng.choice([1, 2, 6, 8, 16], size=per_shard) * TOKENS_PER_IMAGE + 2
        with tar_writer(path) as tar:
            for i, n in enumerate(lengths):
                sentence = np.concatenate([[BOS_ID], rng.integers(0, 8192, n - 2), [EOS_ID]]).astype(np.uint16)
                tar.write({"__key__": f"s{k:06d}{i:04d}", "tokens.npy": sentence, "json": {"kind": "synthetic"}})
        shards[path.name] = {"sentences": per_shard, "tokens": int(lengths.sum()), "bytes": path.stat().st_size}
        written += int(lengths.sum())
        every.append(lengths)
        k += 1
    write_lengths(folder, np.concatenate(every))
    (folder / "index.json").write_text(json.dumps({"shards": shards}))


def measure(shards: str, seq_len: int, batch_size: int, workers: int) -> dict:
    stream = PackedStream(shards, seq_len=seq_len, batch_size=batch_size, seed=0)
    start = time.perf_counter()
    loader = iter(DataLoader(stream, batch_size=None, num_workers=workers))
    first = next(loader)
    ready = time.perf_counter()
    batches = 1 + sum(1 for _ in loader)
    end = time.perf_counter()
    per_batch = first["input_ids"].numel()
    return {
        "batches": batches,
        "tokens": batches * per_batch,
        "startup_s": ready - start,
        "tokens_per_s": (batches - 1) * per_batch / (end - ready),
        "overall_tokens_per_s": batches * per_batch / (end - start),
    }


def measure_resume(shards: str, seq_len: int, batch_size: int, fraction: float) -> tuple[float, int]:
    """Seconds one reader (no workers) takes to its first batch when resumed after ``fraction`` of its epoch, and
    the batches it skipped."""
    stream = PackedStream(shards, seq_len=seq_len, batch_size=batch_size, seed=0)
    consumed = max(1, int(stream.batches_per_epoch() * fraction))
    stream.load_state_dict({"epoch": 0, "batches_consumed": consumed})
    start = time.perf_counter()
    next(iter(stream))
    return time.perf_counter() - start, consumed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--shards", help="sentence shards to read (default: synthetic, written to a temp folder)")
    parser.add_argument("--tokens", type=int, default=30_000_000, help="size of the synthetic data")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resume-at", type=float, default=0.5, help="where in the epoch the resume starts (0..1)")
    args = parser.parse_args()
    if not 0 < args.resume_at < 1:
        parser.error(f"--resume-at: {args.resume_at} is not inside the epoch (0 < it < 1)")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            write_synthetic(Path(tmp), args.tokens)
            shards = tmp
        result = measure(shards, args.seq_len, args.batch_size, args.workers)
        resumed, skipped = measure_resume(shards, args.seq_len, args.batch_size, args.resume_at)
        how = "from lengths.npy" if has_lengths(expand_shards(shards)) else "by re-reading"
        if args.shards is None:
            (Path(tmp) / LENGTHS_NAME).unlink()
            reread, _ = measure_resume(shards, args.seq_len, args.batch_size, args.resume_at)
            how += f", {reread:.2f} s by re-reading (from lengths.npy: {resumed / reread:.2f}x the time)"
    rate = result["tokens_per_s"]
    print(
        f"packed stream: {rate:,.0f} tokens/s ({rate / GPU_TOKENS_PER_S:.0f}x the ~{GPU_TOKENS_PER_S:,} tokens/s "
        f"one GPU consumes training the 1B model); {result['batches']} batches of {args.batch_size} x {args.seq_len}, "
        f"{args.workers} workers, start-up {result['startup_s']:.2f} s "
        f"({result['overall_tokens_per_s']:,.0f} tokens/s counting it)\n"
        f"resume after {skipped} of one reader's batches: first batch in {resumed:.2f} s {how}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
