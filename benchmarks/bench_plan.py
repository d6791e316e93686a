"""How long `lvm.tokenize` (and `lvm.annotate`) take to plan a folder of images, and the memory the plan holds.

    python benchmarks/bench_plan.py                     # 200,000 empty .jpg files in 200 subfolders
    python benchmarks/bench_plan.py --folder photos/    # your own folder (nothing is read, only listed)

Every rank lists and sorts the whole input before taking its share of the units (no rank talks to another), so
at ten million images the plan is paid by every rank on a node. The figures: seconds and bytes per file of
`find_units` (time and memory measured in separate passes, since tracing slows Python), the memory it holds
once done and its peak; then what `lvm.annotate` adds to the plan, the check that no two images of different units
write one map (`_check_keys`). The anchor, in the same run: a bare sorted `os.walk` of the folder, which any plan must
do, and the memory of its paths held as a list of strings.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

from common.options import HelpFormatter
from lvm.annotate.pipeline import _check_keys
from lvm.tokenize.sources import find_units


def make_folder(root: Path, files: int, per_folder: int = 1000) -> None:
    """`files` empty .jpg files, `per_folder` to a subfolder, named like img2dataset's downloads."""
    for n in range(files):
        folder = root / f"{n // per_folder:05d}"
        if n % per_folder == 0:
            folder.mkdir(parents=True)
        (folder / f"{n:09d}.jpg").touch()


def bare_listing(folder: str) -> list[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    return paths


def timed(work) -> tuple[float, object]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def traced(work) -> tuple[int, int, object]:
    """Bytes held by what `work` returns, and its peak, as tracemalloc counts them."""
    tracemalloc.start()
    result = work()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return held, peak, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--folder", help="a folder of images to plan (default: a temporary one of --files)")
    parser.add_argument("--files", type=int, default=200_000, help="empty files in the temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = str(Path(tmp) / "images")
            make_folder(Path(folder), args.files)
        bare_listing(folder)  # warm the directory cache for both
        walk_s, paths = timed(lambda: bare_listing(folder))
        plan_s, (units, _) = timed(lambda: find_units([folder]))
        files = sum(len(u.entries) for u in units)
        del units
        walk_held, _, paths = traced(lambda: bare_listing(folder))
        del paths
        plan_held, plan_peak, (plan, _) = traced(lambda: find_units([folder]))
        keys_s, _ = timed(lambda: _check_keys(plan))
        _, keys_peak, _ = traced(lambda: _check_keys(plan))
    print(f"bare listing: {walk_s:.2f} s, {walk_held / files:.0f} B per file held ({files:,} files)")
    print(f"plan: {plan_s:.2f} s ({plan_s / walk_s:.1f}x the bare listing), {plan_held / files:.0f} B per file held "
          f"({plan_held / walk_held:.2f}x the listing's paths), peak {plan_peak / files:.0f} B per file")
    print(f"annotate's key check: {keys_s:.2f} s more ({keys_s / walk_s:.1f}x the bare listing), "
          f"peak {keys_peak / files:.0f} B per file more")


if __name__ == "__main__":
    main()
