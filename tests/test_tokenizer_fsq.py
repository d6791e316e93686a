"""Finite scalar quantization and the space-to-depth stem (the CPU miniature's tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokenizer
from tokenizer.quantizer import FiniteScalarQuantizer
from tokenizer.training import VQGANTraining

LEVELS = [8, 8, 8, 4, 4]


def _miniature_config(**changes) -> tokenizer.VQGANConfig:
    """The architecture of lvm/demo/configs/vqgan.yaml: 128 px, 4x4 stem + 3 levels = f16, FSQ 8192."""
    fields = dict(resolution=128, patch_size=4, hidden_channels=32, channel_mult=[1, 2, 4], num_res_blocks=1,
                  z_channels=32, embed_dim=5, fsq_levels=LEVELS)
    return tokenizer.VQGANConfig(**{**fields, **changes})


def test_every_id_is_a_distinct_point_of_the_level_grid() -> None:
    fsq = FiniteScalarQuantizer(LEVELS)
    assert (fsq.codebook_size, fsq.embed_dim) == (8192, 5)
    grid = fsq.lookup(torch.arange(8192).view(1, -1), (1, 8192))[0, :, 0].T  # [8192, 5]
    assert len(torch.unique(grid, dim=0)) == 8192
    for channel, levels in enumerate(LEVELS):  # L levels per channel, spaced 1 / (L // 2) inside [-1, 1]
        values = torch.unique(grid[:, channel])
        assert len(values) == levels and float(values.min()) == -1.0
        assert torch.allclose(values.diff(), torch.full((levels - 1,), 1 / (levels // 2)))
    # Channel 0 is the least significant digit of the mixed-radix id.
    assert torch.equal(grid[1] - grid[0], torch.tensor([0.25, 0, 0, 0, 0]))


def test_each_latent_goes_to_its_nearest_level() -> None:
    """Odd level counts sit symmetric about 0: rounding to the nearest level commutes with negation (floor would not)."""
    fsq = FiniteScalarQuantizer([5, 5, 5])
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fsq(-z).z_q, -fsq(z).z_q)
    bounded = torch.tanh(z) * (4 * 1.001 / 2)  # the squashed latent of L = 5 (no offset for odd L)
    assert float((fsq(z).z_q * 2 - bounded).abs().max()) <= 0.5  # levels at multiples of 1 / (L // 2)


def test_forward_codes_and_lookup_agree_and_pass_gradients() -> None:
    torch.manual_seed(0)
    fsq = FiniteScalarQuantizer(LEVELS)
    z = torch.randn(2, 5, 4, 4).requires_grad_()
    out = fsq(z)
    assert out.indices.shape == (2, 16) and int(out.indices.min()) >= 0 and int(out.indices.max()) < 8192
    assert torch.equal(out.indices, fsq.codes(z))
    assert torch.equal(fsq.lookup(out.indices, (4, 4)), out.z_q.detach())
    assert float(out.loss) == 0.0  # no codebook, no VQ loss
    out.z_q.sum().backward()
    assert z.grad is not None and bool((z.grad > 0).all())  # straight-through rounding of a rising tanh
    assert len(torch.unique(fsq.codes(3 * torch.randn(64, 5, 8, 8)))) > 1000  # codes spread, nothing to collapse


def test_stem_tokenizer_is_f16_and_survives_save_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tok = tokenizer.VQTokenizer(_miniature_config()).eval()
    assert tok.config.downsample_factor == 16 and tok.tokens_per_image == 64
    pixels = torch.rand(2, 3, 128, 128)
    tokens = tok.encode_pixels(pixels)
    assert tokens.shape == (2, 64) and torch.equal(tokens, tok(pixels).quantized.indices)
    assert tok.decode(tokens).shape == (2, 3, 128, 128)
    loaded = tokenizer.load(tok.save(tmp_path / "tok"))  # built on the meta device, weights assigned
    assert loaded.config == tok.config
    assert torch.equal(loaded.encode_pixels(pixels), tokens)
    assert torch.equal(loaded.decode(tokens), tok.decode(tokens))


def test_inconsistent_fsq_settings_are_refused_by_name() -> None:
    with pytest.raises(tokenizer.VQGANConfigError, match=r"fsq_levels \[8, 8, 8\] need codebook_size = their product \(512\)"):
        _miniature_config(fsq_levels=[8, 8, 8])
    with pytest.raises(tokenizer.VQGANConfigError, match="restart_dead_codes needs a codebook"):
        VQGANTraining(_miniature_config(), restart_dead_codes=True, lpips_weight=0.0)


@pytest.mark.parametrize("change,fields", [({"l2_normalized_codes": True}, "l2_normalized_codes"),
                                           ({"commitment_cost": 3.0}, "commitment_cost"),
                                           ({"l2_normalized_codes": True, "commitment_cost": 0.0},
                                            "l2_normalized_codes and commitment_cost")])
def test_codebook_only_fields_are_refused_with_fsq(change: dict, fields: str) -> None:
    """FSQ has no codebook: a cosine lookup or a commitment weight given with it would be silently unused."""
    with pytest.raises(tokenizer.VQGANConfigError, match=f"^VQGANConfig: {fields} set, but fsq_levels have no codebook"):
        _miniature_config(**change)
