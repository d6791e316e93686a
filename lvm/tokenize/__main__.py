"""`python -m lvm.tokenize`: images, img2dataset tar shards and videos -> token shards.

    python -m lvm.tokenize --shards laion/          # the released tokenizer, into tokens/laion/
    python -m lvm.tokenize --shards 'laion/{00000..01023}.tar' --out tokens/ --tokenizer lvm-vqgan/
    torchrun --nproc-per-node 8 -m lvm.tokenize --shards laion/ --out tokens/ --tokenizer lvm-vqgan/

See docs/tokenize.md. Exit codes: 0 done, 2 bad input or options (one line: `error: <file>: <problem>`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import weights
from common.errors import exit_on
from common.options import (
    HelpFormatter,
    add_rank_device_arg,
    add_tokenizer_arg,
    at_least,
    default_workers,
    names_of,
    parse_seed,
)
from common.ranks import ranks_from_env
from lvm.tokenize.derive import VARIANTS
from lvm.tokenize.pipeline import VIDEO_RESIZES, Job, Options, run


def parse_args(argv: list[str] | None = None) -> Job:
    """Command line -> Job."""
    p = argparse.ArgumentParser(prog="python -m lvm.tokenize", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--shards", nargs="+", required=True, metavar="SRC",
                   help="folders, globs or brace patterns ('laion/{00000..01023}.tar') of img2dataset tars, "
                        "image folders (recursive) and video files")
    p.add_argument("--out", type=Path, help="output folder of token shards (created; default: tokens/<name of the "
                                            "first source>)")
    add_tokenizer_arg(p, weights.DEFAULT_TOKENIZER)
    p.add_argument("--batch-size", type=at_least(1), default=64, help="images per encoder call (derived variants ride along)")
    p.add_argument("--workers", type=at_least(0), default=default_workers(),
                   help="DataLoader worker processes per rank; each reads whole shards (default: min(8, cores))")
    p.add_argument("--video-stride", type=at_least(1), default=1, help="keep frames 0, k, 2k, ... of every video")
    p.add_argument("--frame-folders", action="store_true",
                   help="every image folder is a sequence of frames (seq/<name>/*.png): record the folder as `video` "
                        "and the position in natural file-name order as `frame`, for video and sequence sentences")
    p.add_argument("--derive", type=names_of(VARIANTS, "variant"), default=(), metavar="gray,masked",
                   help="also tokenize derived images: gray (colorization input), masked (inpainting input)")
    p.add_argument("--label-palette", action="store_true",
                   help="inputs are single-channel segmentation label maps: colour them through the fixed "
                        "256-entry palette before tokenizing")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode JPEGs of at least twice the tokenizer's input size at 1/2, 1/4 or 1/8 scale "
                        "(libjpeg DCT scaling): several times faster on large images, slightly different pixels")
    p.add_argument("--video-resize", choices=VIDEO_RESIZES, default="tokenizer",
                   help="how video frames reach the tokenizer's size: its own resize policy, as images, or 'release': "
                        "as the LVM release tokenized video (OpenCV's bilinear resize to the square, no antialiasing), "
                        "for video the released LVM-7B is to read as it was trained")
    p.add_argument("--seed", type=parse_seed, default=0, help="seed of the inpainting masks (each drawn from seed + key)")
    p.add_argument("--images-per-shard", type=at_least(1), default=1000, help="images of a folder per output shard")
    p.add_argument("--videos-per-shard", type=at_least(1), default=8, help="video files per output shard")
    p.add_argument("--max-shards", type=at_least(1), default=None,
                   help="stop after this many shards (per rank); rerunning the command continues")
    add_rank_device_arg(p)
    a = p.parse_args(argv)
    options = Options(derive=a.derive, video_stride=a.video_stride, label_palette=a.label_palette, seed=a.seed,
                      jpeg_draft=a.jpeg_draft, video_resize=a.video_resize)
    return Job(
        shards=a.shards, out=a.out, tokenizer=a.tokenizer, options=options, batch_size=a.batch_size,
        workers=a.workers, images_per_shard=a.images_per_shard, videos_per_shard=a.videos_per_shard,
        frame_folders=a.frame_folders,
        max_shards=a.max_shards, device=a.device,
    )


@exit_on
def main(argv: list[str] | None = None) -> int:
    """Run the job; print the summary line (or one `error:` line and exit 2)."""
    job = parse_args(argv)
    summary = run(job)
    rank, world, _ = ranks_from_env()
    print(f"[rank {rank}/{world}] " * (world > 1) + summary.line(), flush=True)  # each rank sums up its own share
    return 0


if __name__ == "__main__":
    sys.exit(main())
