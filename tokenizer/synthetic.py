"""Synthetic training images (random shapes and gradients) so tiny VQGAN runs need no download.

    python -m tokenizer.synthetic data/synthetic      # writes train/ (64 images) and val/ (16 images)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.errors import UserError, exit_on
from common.options import HelpFormatter, at_least


def synthetic_image(size: int, rng: np.random.Generator) -> Image.Image:
    """A smooth two-colour gradient with a few random ellipses and rectangles on it."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None] - 0.5 * (np.cos(angle) + np.sin(angle))), 0, 1)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = (a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image


def write_images(out_dir: str | Path, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Write `count` PNGs named 000000.png ... to `out_dir`; same seed, same images."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = out_dir / f"{i:06d}.png"
        synthetic_image(size, rng).save(path)
        paths.append(path)
    return paths


@exit_on
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.synthetic", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (train/ and val/ are created inside; must not hold images)")
    parser.add_argument("--train", type=at_least(1), default=64, help="number of training images")
    parser.add_argument("--val", type=at_least(1), default=16, help="number of validation images")
    parser.add_argument("--size", type=at_least(8), default=64, help="image side in pixels")
    args = parser.parse_args(argv)
    for part in ("train", "val"):  # a rerun with other counts or sizes would leave old images among the new
        if (args.out / part).is_dir() and any((args.out / part).iterdir()):
            raise UserError(args.out / part, "not empty; give a new output folder")
    write_images(args.out / "train", args.train, args.size, seed=0)
    write_images(args.out / "val", args.val, args.size, seed=1)
    print(f"wrote {args.train} training and {args.val} validation images of {args.size}x{args.size} to {args.out}")


if __name__ == "__main__":
    main()
