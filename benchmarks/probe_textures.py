"""Three classes of real photos for `python -m lvm.probe`: crops of scikit-image's brick, grass and gravel.

    python benchmarks/probe_textures.py --out probe_data        # probe_data/{train,val}/{brick,grass,gravel}/*.png
    python -m lvm.probe --model demo_out/lvm/checkpoints/last.ckpt --tokenizer demo_out/vqgan/checkpoints/last.ckpt \\
        --train probe_data/train --val probe_data/val --out probe_out

The photos are the 512x512 grayscale textures scikit-image ships (CC0: CC0Textures Bricks25 and Gravel04,
DeviantArt Grass-01, per `skimage.data`'s notes). `make demo`'s LVM sees them without labels, as camera
pans (unsupervised pre-training on the probe's images, as ImageNet probes of models pre-trained on ImageNet
do); its tokenizer never trains on them. Each class is one photo grouped by source: train crops come from
its top half and val crops from its bottom half, so no val pixel is ever seen by the probe in training. Crops are squares of 96 to 224 pixels at random places, half of them mirrored.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import skimage.data
from PIL import Image, ImageOps

from common.options import HelpFormatter

CLASSES = ("brick", "grass", "gravel")
HALF = 256  # rows 0..255 give the train crops, rows 256..511 the val crops


def crops(photo: Image.Image, top: int, count: int, rng: random.Random) -> list[Image.Image]:
    """`count` square crops lying inside rows top..top + HALF of the photo."""
    out = []
    for _ in range(count):
        side = rng.randint(96, 224)
        x, y = rng.randint(0, photo.width - side), rng.randint(top, top + HALF - side)
        crop = photo.crop((x, y, x + side, y + side))
        out.append(ImageOps.mirror(crop) if rng.random() < 0.5 else crop)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for train/ and val/ (class subfolders)")
    p.add_argument("--train", type=int, default=36, help="train crops per class")
    p.add_argument("--val", type=int, default=18, help="val crops per class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    for name in CLASSES:
        photo = Image.fromarray(getattr(skimage.data, name)())
        for split, top, count in (("train", 0, args.train), ("val", HALF, args.val)):
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(crops(photo, top, count, rng)):
                crop.save(folder / f"{name}_{i:03d}.png")
    print(f"wrote {len(CLASSES)} classes x ({args.train} train + {args.val} val) crops under {args.out}")


if __name__ == "__main__":
    main()
