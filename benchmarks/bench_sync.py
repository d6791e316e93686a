"""Writing many small files durably: one fsync pair per file against one pass of fsyncs before a completion marker.

    python benchmarks/bench_sync.py --files 500 --out /path/on/the/disk/to/measure

`lvm.annotate` writes one map per image and marks a unit complete with its report; the maps need to be durable only
before the report. Times `common.files.atomic_write` per file (fsync of the file, rename, fsync of the folder: the
reference, measured in the same run) against `atomic_write(durable=False)` for every file and then
`common.files.sync_files` over all of them, with files of `--kb` kilobytes (a PNG map of a 512-pixel image).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common.files import atomic_write, sync_files
from common.options import HelpFormatter


def seconds_per_file(folder: Path, files: int, data: bytes, durable: bool) -> float:
    start = time.perf_counter()
    paths = [folder / f"{n:06d}.png" for n in range(files)]
    for path in paths:
        with atomic_write(path, durable=durable) as file:
            file.write(data)
    if not durable:
        sync_files(paths)
    return (time.perf_counter() - start) / files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--kb", type=int, default=20, help="size of each file")
    parser.add_argument("--out", type=Path, default=None, help="a folder on the disk to measure (default: a temporary one)")
    args = parser.parse_args()
    data = os.urandom(args.kb * 1024)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for name in ("each", "batched"):
            (Path(tmp) / name).mkdir()
        each = seconds_per_file(Path(tmp) / "each", args.files, data, durable=True)
        batched = seconds_per_file(Path(tmp) / "batched", args.files, data, durable=False)
    print(f"{args.files} files of {args.kb} KB: fsync per file {each * 1e3:.2f} ms/file; one pass before the marker "
          f"{batched * 1e3:.2f} ms/file ({each / batched:.1f}x faster)")


if __name__ == "__main__":
    main()
