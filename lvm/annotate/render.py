"""Pure pixel functions of the annotation tasks: no model, no I/O, so tests can check each against geometry.

Conventions (docs/FORMATS.md):
- edges: white (255) edge pixels on black, 8-bit gray;
- depth: nearness, brighter = closer, normalised per image to the full 16-bit range;
- normals: unit vectors in the camera frame x right, y up, z towards the camera, stored as RGB = n * 0.5 + 0.5
  (a surface facing the camera is (128, 128, 255), the usual light blue);
- segmentation: label ids (modulo 256) as a palette PNG carrying `lvm.palette.label_palette()`.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from lvm.palette import label_palette

CANNY_THRESHOLDS = (100, 200)  # hysteresis low/high on 8-bit gradients, ControlNet's Canny annotator at 512 px
RELIEF = 0.5  # depth range of the scene, as a fraction of the image's longer side, when normals come from depth
_PALETTE = label_palette().reshape(-1).tolist()


def fit(pixels: Tensor, max_size: int) -> Tensor:
    """[3, H, W] pixels shrunk (antialiased, aspect kept) so the longer side is at most max_size (0: unchanged)."""
    height, width = pixels.shape[-2:]
    scale = max_size / max(height, width) if max_size else 1.0
    if scale >= 1.0:
        return pixels
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def to_uint8(pixels: Tensor) -> np.ndarray:
    """[3, H, W] floats in [0, 1] -> contiguous uint8 [H, W, 3]."""
    return np.ascontiguousarray((pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def edges(rgb: np.ndarray) -> np.ndarray:
    """Canny edges of uint8 RGB [H, W, 3] -> uint8 [H, W] in {0, 255}.

    OpenCV's Canny on the colour image (per pixel the channel with the strongest gradient, 3x3 Sobel, L1
    magnitude) with thresholds 100 and 200: the settings of ControlNet's widely used Canny annotator, which
    also works at a 512 px longer side, so the maps look like the edge conditioning images models know.
    """
    return cv2.Canny(rgb, *CANNY_THRESHOLDS)


def nearness(depth: Tensor, metric: bool) -> Tensor:
    """A depth model's output [H, W] -> nearness in [0, 1] (1 = closest), normalised per image (min -> 0, max -> 1).

    Relative models (Depth Anything, DPT) predict inverse depth (disparity) up to scale and shift, which
    is already nearness; metric models predict distance, which is inverted first. A constant map gives 0.
    """
    depth = depth.float()
    if metric:
        depth = 1.0 / depth.clamp_min(1e-6)
    low, high = depth.min(), depth.max()
    return (depth - low) / (high - low).clamp_min(1e-12)


def fill_depth_holes(depth: Tensor) -> Tensor:
    """A metric model's distances [B, ..., H, W] with each image's places of no estimate (0 or less: sky, an invalid
    pixel) set to its farthest distance, at the model's own resolution, before any resize: 1 / 1e-6 made the rest of
    the map flat black in `nearness`, and a bilinear resize first smears the zeros into small distances at a hole's
    edge, which would pass for the nearest things in view."""
    flat = depth.flatten(1)
    farthest = flat.amax(1).clamp_min(0).view(-1, *[1] * (depth.dim() - 1))
    return depth.where(depth > 0, farthest)


def normals_from_depth(depth: Tensor) -> Tensor:
    """Unit surface normals [3, H, W] of a depth map [H, W] (distance, in pixel units), by finite differences.

    The map is read as a surface z = -depth(u, v) seen head-on (u right, v down): central differences inside,
    one-sided at the border (`torch.gradient`); the normal of (u, -v, -depth) is (d_u, -d_v, 1), normalised.
    """
    d_v, d_u = torch.gradient(depth.float())
    normals = torch.stack([d_u, -d_v, torch.ones_like(d_u)])
    return normals / normals.norm(dim=0, keepdim=True)


def normals_from_nearness(near: Tensor) -> Tensor:
    """Normals of a per-image normalised nearness map: its range taken as RELIEF times the longer side.

    Nearness from a relative model fixes neither scale nor shift, so the strength of the relief is a choice:
    RELIEF = 0.5 makes the nearest-to-farthest range half the image's longer side.
    """
    return normals_from_depth((1.0 - near) * RELIEF * max(near.shape))


def encode_normals(normals: Tensor) -> np.ndarray:
    """Unit normals [3, H, W] -> uint8 RGB [H, W, 3] = round((n * 0.5 + 0.5) * 255)."""
    return to_uint8((normals * 0.5 + 0.5).clamp(0, 1).cpu())


def png(array: np.ndarray, labels: bool = False) -> bytes:
    """PNG bytes of uint8 [H, W] (gray), uint16 [H, W] (16-bit gray), uint8 [H, W, 3] (RGB), or with labels=True
    label ids uint8 [H, W] as a palette image carrying the fixed 256-entry palette.

    A palette PNG shows the colours in any viewer and gives the same RGB pixels to `lvm.tokenize` with or
    without `--label-palette` (indices through the same palette either way), while keeping the ids.
    """
    if labels:
        image = Image.frombytes("P", array.shape[::-1], np.ascontiguousarray(array, dtype=np.uint8).tobytes())
        image.putpalette(_PALETTE)
    else:
        image = Image.fromarray(np.ascontiguousarray(array))  # uint16 [H, W] becomes mode I;16
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)  # fast: annotations are re-encoded by the tokenizer anyway
    return buffer.getvalue()
