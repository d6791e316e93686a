"""The fixed 256-entry colour table for segmentation label maps: one palette for every stage.

`lvm.tokenize --label-palette` colours single-channel label maps through it before tokenizing, and
`lvm.annotate --tasks segmentation` writes its label maps as palette PNGs carrying it, so a label means the
same colour whichever way a map reaches the tokenizer. The release coloured segmentation through a fixed
random 256-entry palette too (ytongbai/LVM, tokenize_examples/map_color.py), whose colours were never published.
This one is drawn from Python's `random` seeded by a string, whose stream is stable across Python and NumPy
versions, so the colours never change.
"""

from __future__ import annotations

import random

import numpy as np

PALETTE_SEED = "lvm-segmentation-palette-v1"


def label_palette() -> np.ndarray:
    """The fixed colour table [256, 3] uint8 (row i is the colour of label i)."""
    return np.frombuffer(random.Random(PALETTE_SEED).randbytes(256 * 3), dtype=np.uint8).reshape(256, 3).copy()


def colour_labels(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Label indices uint8 [H, W] -> RGB uint8 [H, W, 3] through the palette."""
    return palette[labels]
