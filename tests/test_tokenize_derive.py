"""Derived images of the tokenize step: gray, inpainting masks, segmentation palette (pure pixel functions)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lvm.palette import colour_labels, label_palette
from lvm.tokenize.decode import to_labels
from lvm.tokenize.derive import apply_mask, gray, mask_params


def test_gray_uses_release_weights_and_replicates_channels():
    rgb = torch.zeros(3, 2, 2)
    rgb[0, 0, 0] = 1.0  # pure red
    rgb[1, 0, 1] = 1.0  # pure green
    rgb[2, 1, 0] = 1.0  # pure blue
    rgb[:, 1, 1] = 1.0  # white
    out = gray(rgb)
    assert out.shape == (3, 2, 2)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    expected = torch.tensor([[0.2989, 0.587], [0.114, 0.9999]])
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_masks_are_a_function_of_seed_and_key():
    assert mask_params("000123", 0) == mask_params("000123", 0)
    draws = [mask_params(f"{i:06d}", 0) for i in range(200)]
    assert draws != [mask_params(f"{i:06d}", 1) for i in range(200)]
    partial = [str(d) for d in draws if 0 < len(d.get("patches", [0])) < 64]  # none or all: equal by nature
    assert len(set(partial)) == len(partial) > 180


def test_mask_recipe_holes_and_patches():
    draws = [mask_params(f"k{i}", 7) for i in range(3000)]
    holes = [d for d in draws if d["kind"] == "hole"]
    assert abs(len(holes) / len(draws) - 0.3) < 0.03  # hole with probability 0.3
    for d in holes:
        assert 0.1 <= d["side"] <= 0.5 and 0 <= d["x"] <= 1 - d["side"] and 0 <= d["y"] <= 1 - d["side"]
    patches = [d for d in draws if d["kind"] == "patches"]
    for d in patches:
        assert d["grid"] == 8 and d["patches"] == sorted(set(d["patches"])) and all(0 <= p < 64 for p in d["patches"])
    # The release's recipe: each patch zeroed with probability 1 - r, r ~ U(0, 1) per image, so the zeroed
    # fraction is about uniform on [0, 1] (mean 0.5, over half the image about half the time).
    fractions = np.array([len(d["patches"]) / 64 for d in patches])
    assert abs(fractions.mean() - 0.5) < 0.03 and abs((fractions > 0.5).mean() - 0.5) < 0.05
    assert np.histogram(fractions, bins=4, range=(0, 1))[0].min() > 0.2 * len(patches)  # every quarter well used


def test_patch_mask_zeroes_aligned_32px_cells_at_256():
    x = torch.rand(3, 256, 256) + 0.1  # no zeros before masking
    out = apply_mask(x, {"kind": "patches", "grid": 8, "patches": [0, 9, 14, 63]})
    zero = (out == 0).all(0)
    expected = torch.zeros(256, 256, dtype=torch.bool)
    for row, col in ((0, 0), (1, 1), (1, 6), (7, 7)):  # cell 14 = row 1, column 6: indices are row-major
        expected[row * 32 : (row + 1) * 32, col * 32 : (col + 1) * 32] = True
    assert torch.equal(zero, expected)
    assert torch.equal(out[:, ~expected], x[:, ~expected])  # everything else untouched, input not modified
    assert (x > 0).all()


def test_hole_is_square_in_the_tokenizer_view_of_a_non_square_image():
    x = torch.ones(3, 100, 200)
    out = apply_mask(x, {"kind": "hole", "side": 0.25, "x": 0.5, "y": 0.1})
    rows, cols = torch.nonzero((out == 0).all(0), as_tuple=True)
    assert (rows.min().item(), rows.max().item()) == (10, 34)  # 25% of the height
    assert (cols.min().item(), cols.max().item()) == (100, 149)  # 25% of the width
    assert int((out == 0).all(0).sum()) == 25 * 50


def test_a_centre_crop_tokenizer_sees_a_square_hole_and_square_patches():
    """A taming tokenizer crops the central 100 x 100 of a 100 x 200 image: the mask lives in that square."""
    x = torch.ones(3, 100, 200)
    out = apply_mask(x, {"kind": "hole", "side": 0.25, "x": 0.5, "y": 0.1}, "center_crop")
    rows, cols = torch.nonzero((out == 0).all(0), as_tuple=True)
    assert (rows.min().item(), rows.max().item()) == (10, 34)
    assert (cols.min().item(), cols.max().item()) == (100, 124)  # 50 + 50 into the crop, 25 wide: square
    patches = apply_mask(x, {"kind": "patches", "grid": 4, "patches": [0, 15]}, "center_crop")
    zeroed = (patches == 0).all(0)
    assert zeroed[:25, 50:75].all() and zeroed[75:, 125:150].all() and int(zeroed.sum()) == 2 * 25 * 25


def test_palette_is_fixed_and_colours_labels():
    palette = label_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert np.array_equal(palette, label_palette())
    assert len({tuple(c) for c in palette}) > 250  # distinct colours for distinct labels
    labels = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    coloured = colour_labels(labels, palette)
    assert coloured.shape == (2, 2, 3)
    assert np.array_equal(coloured[0, 1], palette[1]) and np.array_equal(coloured[1, 0], palette[255])


def test_label_maps_read_indices_not_colours():
    indices = np.array([[0, 3], [7, 3]], dtype=np.uint8)
    p_image = Image.fromarray(indices, mode="L").convert("P")
    p_image.putpalette([255, 0, 0] * 256)  # colours must be ignored
    assert np.array_equal(to_labels(p_image), indices)
    assert np.array_equal(to_labels(Image.fromarray(np.stack([indices] * 3, axis=2))), indices)  # gray saved as RGB
    blue = np.stack([indices, indices, indices + 1], axis=2)  # R == G, B differs: a colour image
    assert to_labels(Image.fromarray(blue)) is None
    assert np.array_equal(to_labels(Image.fromarray((indices.astype(np.uint16) + 512))), indices)  # 16-bit mod 256
    colour = np.zeros((2, 2, 3), dtype=np.uint8)
    colour[0, 0] = (10, 20, 30)
    assert to_labels(Image.fromarray(colour)) is None


@pytest.mark.parametrize("kind", ["hole", "patches"])
def test_mask_parameters_in_json_reproduce_the_mask(kind):
    key = next(f"k{i}" for i in range(100) if mask_params(f"k{i}", 0)["kind"] == kind)
    params = mask_params(key, 0)
    x = torch.rand(3, 64, 48) + 0.1
    assert torch.equal(apply_mask(x, json.loads(json.dumps(params))), apply_mask(x, params))
