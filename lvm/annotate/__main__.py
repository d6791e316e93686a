"""`python -m lvm.annotate`: images and img2dataset tar shards -> edge, depth, normal and segmentation maps.

    python -m lvm.annotate --images photos/ --tasks edges --out annot/
    torchrun --nproc-per-node 8 -m lvm.annotate --images 'laion/{00000..00099}.tar' --out annot/ \\
        --tasks depth,normals,segmentation --depth-model depth-anything/Depth-Anything-V2-Large-hf \\
        --seg-model facebook/mask2former-swin-large-ade-semantic

Writes `annot/<task>/`, keyed like the images, ready for `lvm.tokenize` and `pairs` / `multitask` sentences.
See docs/FORMATS.md. Exit codes: 0 done, 2 bad input, options or models (one line: `error: ...`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import exit_on
from common.options import HelpFormatter, add_rank_device_arg, at_least, default_workers, names_of
from common.ranks import ranks_from_env
from lvm.annotate import TASKS
from lvm.annotate.pipeline import Job, run


def parse_args(argv: list[str] | None = None) -> Job:
    """Command line -> Job."""
    p = argparse.ArgumentParser(prog="python -m lvm.annotate", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--images", nargs="+", required=True, metavar="SRC",
                   help="image folders (recursive), img2dataset tars, globs or brace patterns: what lvm.tokenize takes")
    p.add_argument("--tasks", type=names_of(TASKS, "task"), required=True, metavar=",".join(TASKS), help="annotations to make")
    p.add_argument("--out", type=Path, required=True, help="output folder: one subfolder per task (created)")
    p.add_argument("--depth-model", help="transformers depth model (local folder or hub id), for depth and normals, "
                                         "e.g. depth-anything/Depth-Anything-V2-Large-hf")
    p.add_argument("--normals-model", help="transformers normal-estimation model; without it normals come from depth")
    p.add_argument("--seg-model", help="transformers segmentation model (local folder or hub id), "
                                       "e.g. facebook/mask2former-swin-large-ade-semantic")
    p.add_argument("--max-size", type=at_least(0), default=512,
                   help="longer side of the annotations: larger images are shrunk first (0: keep their size)")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="images per model call")
    p.add_argument("--workers", type=at_least(0), default=default_workers(),
                   help="DataLoader worker processes per rank (decoding, edges, model preprocessing)")
    p.add_argument("--images-per-shard", type=at_least(1), default=1000, help="images of a folder per unit (one report each)")
    p.add_argument("--max-shards", type=at_least(1), default=None,
                   help="stop after this many units (per rank); rerunning the command continues")
    add_rank_device_arg(p)
    a = p.parse_args(argv)
    return Job(
        images=a.images, out=a.out, tasks=a.tasks, depth_model=a.depth_model, normals_model=a.normals_model,
        seg_model=a.seg_model, max_size=a.max_size, batch_size=a.batch_size, workers=a.workers,
        images_per_shard=a.images_per_shard, max_shards=a.max_shards, device=a.device,
    )


@exit_on
def main(argv: list[str] | None = None) -> int:
    """Run the job; print the summary line (or one `error:` line and exit 2)."""
    summary = run(parse_args(argv))
    rank, world, _ = ranks_from_env()
    print(f"[rank {rank}/{world}] " * (world > 1) + summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
