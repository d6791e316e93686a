"""Pure pixel functions that make the derived images the sentence builders pair with the originals.

Gray and masked work on FloatTensor[3, H, W] in [0, 1] at the image's original size, before the
tokenizer's resize and value-range mapping, so "zeroed" means black for every tokenizer. Randomness comes from Python's `random`
seeded by strings, whose streams are stable across Python and NumPy versions, so a mask drawn today
is drawn identically years later. The recipes are the paper's (Bai et al., 2023, "Sequential Modeling
Enables Scalable Learning for Large Vision Models", Sec. 3 and appendix: colorization, inpainting); the
segmentation palette lives in `lvm.palette`, shared with `lvm.annotate`.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # R, G, B
HOLE_PROBABILITY = 0.3  # otherwise patches
HOLE_SIDE = (0.1, 0.5)  # side of the square hole, as a fraction of the image side
PATCH_GRID = 8  # 8x8 patches: 32x32 pixels each in the tokenizer's 256x256 view
# Version of the mask recipe, part of the tokenize fingerprint of shards with masked images. 2: each patch
# zeroed with probability 1 - r, r ~ U(0, 1) per image, as the release does (1 zeroed 10%..50% of them).
MASK_RECIPE = 2
VARIANTS = ("gray", "masked")


def gray(rgb: Tensor) -> Tensor:
    """Colorization input: 0.2989 R + 0.587 G + 0.114 B, replicated to 3 channels."""
    luma = torch.tensordot(torch.tensor(GRAY_WEIGHTS, dtype=rgb.dtype), rgb, dims=1)
    return luma.unsqueeze(0).expand(3, -1, -1).contiguous()


def mask_params(key: str, seed: int) -> dict:
    """The inpainting mask of one sample, drawn from (seed, key) only, in resolution-free units.

    With probability 0.3 a square hole: side `side` and top-left corner (`x`, `y`) as fractions of
    the image width and height (square in the tokenizer's square view). Otherwise `patches`: the
    indices (row-major) of the zeroed cells of a `grid` x `grid` partition of the image, each cell zeroed
    with probability 1 - r for one r ~ U(0, 1) per image, as in the release's inpainting data: on average half
    the image, from none of it to all of it.
    """
    rng = random.Random(f"{seed}:{key}")
    if rng.random() < HOLE_PROBABILITY:
        side = round(rng.uniform(*HOLE_SIDE), 6)
        return {"kind": "hole", "side": side, "x": round(rng.uniform(0.0, 1.0 - side), 6), "y": round(rng.uniform(0.0, 1.0 - side), 6)}
    kept = rng.random()
    zeroed = [cell for cell in range(PATCH_GRID * PATCH_GRID) if rng.random() >= kept]
    return {"kind": "patches", "grid": PATCH_GRID, "patches": zeroed}


def apply_mask(rgb: Tensor, params: dict, resize: str = "stretch") -> Tensor:
    """A copy of [C, H, W] pixels with the pixels under the mask set to 0 (black).

    The mask's fractions are of the part of the image the tokenizer sees (`resize`, its policy): the whole
    image for `stretch`, the central square for `center_crop`, so that holes stay square and patches on the
    grid of its square view either way.
    """
    out = rgb.clone()
    height, width = rgb.shape[-2:]
    top = left = 0
    if resize == "center_crop":
        side = min(height, width)
        top, left, height, width = (height - side) // 2, (width - side) // 2, side, side
    view = out[:, top : top + height, left : left + width]  # a view: writing it writes `out`
    if params["kind"] == "hole":
        x, y, side = params["x"], params["y"], params["side"]
        view[:, round(y * height) : round((y + side) * height), round(x * width) : round((x + side) * width)] = 0
        return out
    grid = params["grid"]
    for cell in params["patches"]:
        row, col = divmod(cell, grid)
        view[:, row * height // grid : (row + 1) * height // grid, col * width // grid : (col + 1) * width // grid] = 0
    return out
