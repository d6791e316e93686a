"""The one description of a VQGAN: architecture plus the preprocessing it expects.

A single dataclass covers the released LVM tokenizer (open-muse `VQGANModel`),
taming-transformers VQGANs and the models this project trains, so that every
loader converts into it and every consumer reads the same fields. It is saved as
JSON next to the weights; the preprocessing policy travels with the weights so
no caller re-implements it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from common.errors import UserError

ResizeMode = Literal["stretch", "center_crop"]


class VQGANConfigError(UserError, ValueError):
    """An impossible tokenizer architecture; the message names the fields (the `lightning` CLI prints it as one line)."""


@dataclass
class VQGANConfig:
    """Architecture, quantizer and preprocessing of one VQGAN.

    Defaults are the released LVM tokenizer (f=16, 8192 codes, 256 tokens per
    256x256 image). Attention and GroupNorm(32) need channel counts divisible by 32.
    """

    resolution: int = 256  # square input side; tokens_per_image = (resolution // 2**(len(channel_mult)-1))**2
    in_channels: int = 3
    hidden_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4, 6])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)  # feature-map sides that get an AttnBlock
    mid_attention: bool = False  # attention between the two mid ResnetBlocks (taming: on; LVM release: off)
    z_channels: int = 64
    embed_dim: int = 64  # code dimension (LlamaGen's l2-normalised recipe uses 8)
    codebook_size: int = 8192
    l2_normalized_codes: bool = False  # LlamaGen: cosine-similarity lookup, keeps codebook usage high
    # Finite scalar quantization (Mentzer et al. 2023) instead of a learned codebook: each of the
    # len(fsq_levels) latent channels is rounded to one of L_i levels and the code is their mixed-radix
    # number, so prod(fsq_levels) == codebook_size ([8, 8, 8, 4, 4] = 8192). No codebook means nothing to
    # collapse: short CPU runs keep hundreds of codes in use where a codebook keeps a handful.
    fsq_levels: list[int] = field(default_factory=list)
    # Space-to-depth stem: the encoder sees pixel_unshuffle(x, patch_size) and the decoder ends in
    # pixel_shuffle, so f = patch_size * 2**(len(channel_mult)-1) with fewer convolutions at full
    # resolution (the CPU miniature uses 4: f=16 at ~1/4 of the cost). 1 = the released architecture.
    patch_size: int = 1
    commitment_cost: float = 0.25
    dropout: float = 0.0
    # Preprocessing policy, part of the checkpoint:
    value_range: tuple[float, float] = (0.0, 1.0)  # open-muse/LVM: [0, 1]; taming: [-1, 1]
    resize: ResizeMode = "stretch"  # LVM: straight to SxS (no crop); taming: shorter side to S + centre crop

    def __post_init__(self) -> None:
        # A hand-edited config.json: "false" is a true string (it switched the cosine lookup on, tokens changed) and
        # 8192.0 a float (a traceback from torch): the JSON types are checked against the fields'.
        for spec in dataclasses.fields(self):
            value, wanted = getattr(self, spec.name), {"bool": bool, "int": int, "float": (int, float)}.get(spec.type)
            if wanted is None:
                continue
            if isinstance(value, bool) != (spec.type == "bool") or not isinstance(value, wanted):
                kind = {"bool": "true or false", "int": "a whole number", "float": "a number"}[spec.type]
                raise VQGANConfigError(f"VQGANConfig: {spec.name} must be {kind}, got {value!r}")
        for name in ("channel_mult", "attn_resolutions", "fsq_levels"):  # whole floats too: yamls write 1.0
            items = getattr(self, name)
            if not isinstance(items, (list, tuple)) or not all(
                    isinstance(i, (int, float)) and not isinstance(i, bool) and float(i).is_integer() for i in items):
                raise VQGANConfigError(f"VQGANConfig: {name} must be a list of whole numbers, got {items!r}")
        value_range = self.value_range
        if not isinstance(value_range, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value_range):
            raise VQGANConfigError(f"VQGANConfig: value_range must be two numbers (low, high), got {value_range!r}")
        self.channel_mult = [int(m) for m in self.channel_mult]
        self.attn_resolutions = [int(r) for r in self.attn_resolutions]
        self.fsq_levels = [int(level) for level in self.fsq_levels]
        if len(self.value_range) != 2:
            raise VQGANConfigError(f"VQGANConfig: value_range must be two numbers (low, high), got {list(self.value_range)}")
        self.value_range = (float(self.value_range[0]), float(self.value_range[1]))
        sizes = ("resolution", "hidden_channels", "z_channels", "embed_dim", "codebook_size", "patch_size")
        for name in sizes:
            if getattr(self, name) < 1:
                raise VQGANConfigError(f"VQGANConfig: {name} must be at least 1, got {getattr(self, name)}")
        if self.in_channels != 3:  # kept as a field: taming and open-muse configs name it
            raise VQGANConfigError(f"VQGANConfig: in_channels must be 3 (preprocessing and the training data give RGB), "
                                   f"got {self.in_channels}")
        if self.num_res_blocks < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise VQGANConfigError(  # (0 blocks cannot change a level's channels: the first forward would fail)
                f"VQGANConfig: needs num_res_blocks >= 1 and a non-empty channel_mult of positive integers, got "
                f"{self.num_res_blocks} and {self.channel_mult}"
            )
        if not self.value_range[0] < self.value_range[1] or not 0.0 <= self.dropout < 1.0:
            raise VQGANConfigError(
                f"VQGANConfig: needs value_range (low, high) with low < high and 0 <= dropout < 1, got "
                f"{self.value_range} and {self.dropout}"
            )
        for mult in self.channel_mult:
            if (self.hidden_channels * mult) % 32:
                raise VQGANConfigError(
                    f"VQGANConfig: hidden_channels * channel_mult must be divisible by 32 (GroupNorm(32)); "
                    f"got {self.hidden_channels} * {mult}"
                )
        if self.resolution % self.downsample_factor:
            raise VQGANConfigError(f"VQGANConfig: resolution {self.resolution} is not divisible by the downsampling factor {self.downsample_factor}")
        if self.fsq_levels:
            if math.prod(self.fsq_levels) != self.codebook_size or self.embed_dim != len(self.fsq_levels):
                raise VQGANConfigError(
                    f"VQGANConfig: fsq_levels {self.fsq_levels} need codebook_size = their product "
                    f"({math.prod(self.fsq_levels)}) and embed_dim = their count ({len(self.fsq_levels)}); "
                    f"got codebook_size {self.codebook_size}, embed_dim {self.embed_dim}"
                )
            if min(self.fsq_levels) < 2:
                raise VQGANConfigError(f"VQGANConfig: every fsq level must be >= 2, got {self.fsq_levels}")
            unused = [name for name in ("l2_normalized_codes", "commitment_cost") if getattr(self, name) != getattr(VQGANConfig, name)]
            if unused:  # set, they would look like part of the recipe while doing nothing
                raise VQGANConfigError(f"VQGANConfig: {' and '.join(unused)} set, but fsq_levels have no codebook for them "
                                       "to act on; leave them at their defaults")
        if self.resize not in ("stretch", "center_crop"):
            raise VQGANConfigError(f"VQGANConfig: resize must be 'stretch' or 'center_crop', got {self.resize!r}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side (16 for five levels, or a 4x4 stem and three)."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Tokens per image side."""
        return self.resolution // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists, not tuples) for config.json and checkpoints."""
        data = dataclasses.asdict(self)
        data["value_range"] = list(self.value_range)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VQGANConfig":
        """Inverse of `to_dict`; unknown keys are an error so typos do not pass silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VQGANConfigError(f"unknown VQGAN config keys: {', '.join(unknown)}")
        return cls(**data)
