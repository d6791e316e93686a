"""Image -> model input: one conversion for every image a user can hand the tokenizer.

Callers pass PIL images, numpy arrays or uint8 tensors of any size and mode; this
module turns them into RGB float tensors with the resize policy and value range
of the loaded checkpoint. Transparent images are composited over white (dropping
alpha would expose whatever colour hides under transparent pixels), grayscale is
replicated to RGB, 16-bit grayscale images and uint16 arrays keep their precision until the final resize (Pillow
opens 16-bit RGB files as 8-bit).
"""

from __future__ import annotations

import struct
from typing import Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

ImageLike = Union[Image.Image, np.ndarray, Tensor]

UNREADABLE_IMAGE = (OSError, Image.UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
                    struct.error, TypeError)
"""What opening and decoding a damaged, truncated or oversized image file raises with Pillow (a decompression
bomb is no OSError; a damaged EXIF block raises struct.error or TypeError when the orientation is applied): the
one list every reader of image files skips or reports."""

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # PNG 16-bit grayscale opens as one of these


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """PIL image -> HxWxC float32 in [0, 1], C in {1, 2, 3, 4} (alpha last). A 32-bit integer image past 16 bits or
    a float image outside [0, 1] (a depth map in metres, a float export) has no range to read it in: a ValueError,
    which every reader skips and reports, rather than the flat white picture clipping made of it."""
    if image.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float32)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(f"32-bit integer image with values in [{array.min():g}, {array.max():g}]: no known range; "
                             "save it with 8 or 16 bits")
        gray = (array / 65535.0)[..., None]
        key = image.info.get("transparency")  # a 16-bit gray PNG's tRNS: the one gray value that is transparent
        return np.concatenate([gray, (array != key)[..., None]], -1, dtype=np.float32) if isinstance(key, int) else gray
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ValueError(f"float image with values in [{np.nanmin(array):g}, {np.nanmax(array):g}], not [0, 1]: "
                             "save it with 8 or 16 bits")
        return array[..., None]
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha and image.mode not in ("RGBA", "LA"):
        image = image.convert("RGBA")  # palette/premultiplied alpha -> straight RGBA
    elif image.mode not in ("RGB", "L", "RGBA", "LA"):
        image = image.convert("RGB")  # 1, CMYK, YCbCr, LAB, HSV, P without transparency
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array if array.ndim == 3 else array[..., None]


def _array_to_float(array: np.ndarray) -> np.ndarray:
    """HxW or HxWxC uint8/uint16 array -> HxWxC float32 in [0, 1]."""
    if array.dtype == np.uint8:
        scale = 255.0
    elif array.dtype == np.uint16:
        scale = 65535.0
    else:
        raise TypeError(f"unsupported image array dtype {array.dtype} (expected uint8 or uint16)")
    array = array.astype(np.float32) / scale
    return array if array.ndim == 3 else array[..., None]


def to_rgb_float(image: ImageLike) -> Tensor:
    """Any supported image -> FloatTensor[3, H, W] in [0, 1], alpha composited over white; a PIL image turned as its
    EXIF orientation says first, as viewers show it (and as `lvm.tokenize` encodes the file), so `tok.encode` of a
    phone photo gives the tokens training saw."""
    if isinstance(image, Image.Image):
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # no copy for the usual unturned image
            image = ImageOps.exif_transpose(image)
        x = torch.from_numpy(np.ascontiguousarray(_pil_to_array(image))).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"expected an HxW or HxWxC image array, got shape {image.shape}")
        x = torch.from_numpy(np.ascontiguousarray(_array_to_float(image))).permute(2, 0, 1)
    elif isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise ValueError(f"expected a uint8 Tensor[C, H, W], got {image.dtype} of shape {tuple(image.shape)}")
        x = image.cpu().float() / 255.0
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}")
    channels = x.shape[0]
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"expected 1 to 4 channels (L, LA, RGB, RGBA), got {channels}")
    if channels in (2, 4):  # composite over white: c * a + 1 * (1 - a)
        alpha = x[-1:]
        x = x[:-1] * alpha + (1.0 - alpha)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def to_value_range(x01: Tensor, value_range: tuple[float, float]) -> Tensor:
    """Map [0, 1] pixels to the model's input range."""
    low, high = value_range
    return x01 * (high - low) + low


def from_value_range(x: Tensor, value_range: tuple[float, float]) -> Tensor:
    """Inverse of `to_value_range` (no clamping)."""
    low, high = value_range
    return (x - low) / (high - low)


MAX_ASPECT = 4
"""How much longer than the shorter side the longer one may be when the shorter is resized first (`cut_aspect`)."""


def cut_aspect(x: Tensor, at_random: bool = False) -> Tensor:
    """[C, H, W] with its longer side cut to at most MAX_ASPECT x the shorter: the centre, or a random window.

    Resizing the shorter side of a 1x3000 banner to 256 would make a [3, 256, 768000] tensor (2.2 GiB) to keep
    1/3000 of it; after this cut it is [3, 256, 1024]. Photos and video frames (up to 4:1) are left as they are,
    so their pixels, and the random draws of training, are those of the plain resize-then-crop."""
    height, width = x.shape[-2:]
    limit = MAX_ASPECT * min(height, width)
    if max(height, width) <= limit:
        return x
    start = int((max(height, width) - limit) * (float(torch.rand(())) if at_random else 0.5))
    return x[..., start : start + limit, :] if height > width else x[..., start : start + limit]


def resize_square(x: Tensor, size: int, mode: str) -> Tensor:
    """[C, H, W] -> [C, size, size]: 'stretch' straight to the square, 'center_crop' keeps the aspect ratio,
    'release_video' stretches as the LVM release resized video frames: OpenCV's ``cv2.resize(frame, (size,
    size))``, bilinear without antialiasing (its images went through PIL, bicubic with it: 'stretch')."""
    if x.shape[-2:] == (size, size):
        return x
    if mode == "stretch":
        return TF.resize(x, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if mode == "release_video":
        return TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=False)
    if mode != "center_crop":  # a misspelt mode would otherwise crop without a word
        raise ValueError(f"unknown resize mode {mode!r} (stretch, center_crop or release_video)")
    x = TF.resize(cut_aspect(x), size, interpolation=InterpolationMode.BICUBIC, antialias=True)  # shorter side -> size
    return TF.center_crop(x, [size, size])


def preprocess_image(image: ImageLike, size: int, resize: str, value_range: tuple[float, float]) -> Tensor:
    """The tokenizer's input for one image: FloatTensor[3, size, size] in `value_range`."""
    return finish_preprocessing(to_rgb_float(image), size, resize, value_range)


def finish_preprocessing(x01: Tensor, size: int, resize: str, value_range: tuple[float, float]) -> Tensor:
    """`preprocess_image` after the colour conversion: [3, H, W] RGB in [0, 1] -> the tokenizer's input. Separate
    for the tokenize step, which derives images (gray, masked) in between."""
    x = resize_square(x01, size, resize).clamp(0.0, 1.0)  # bicubic overshoots
    return to_value_range(x, value_range).contiguous()
