"""VQGAN encoder/decoder built from taming-transformers' blocks, and the tokenizer around them.

Module names follow taming's `Encoder`/`Decoder` and open-muse's `VQGANModel`
(`encoder.down.{i}.block.{j}`, `decoder.up.{i}.upsample.conv`, `quantize.embedding.weight`,
...), so released state dicts load without renaming. Taming's own `Encoder`/`Decoder`
cannot be used as they are: their mid-block attention cannot be switched off (the
LVM release has none) and their encoder output is doubled for VAEs; hence these
thin compositions of taming's `ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from taming.modules.diffusionmodules.model import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample
from torch import Tensor, nn

import weights
from common.files import atomic_write, commit_file, tmp_path, umask_mode
from tokenizer.config import VQGANConfig
from tokenizer.preprocess import ImageLike, from_value_range, preprocess_image
from tokenizer.quantizer import FiniteScalarQuantizer, QuantizerOutput, VectorQuantizer

FORMAT_NAME = "lvm-vqgan"  # marks config.json files written by `VQTokenizer.save`
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _resnet(in_ch: int, out_ch: int, dropout: float) -> ResnetBlock:
    return ResnetBlock(in_channels=in_ch, out_channels=out_ch, dropout=dropout, temb_channels=0)


def _mid_block(channels: int, cfg: VQGANConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = _resnet(channels, channels, cfg.dropout)
    if cfg.mid_attention:
        mid.attn_1 = AttnBlock(channels)
    mid.block_2 = _resnet(channels, channels, cfg.dropout)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    h = mid.block_1(h, None)
    if hasattr(mid, "attn_1"):
        h = mid.attn_1(h)
    return mid.block_2(h, None)


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    """Residual blocks of one resolution, each followed by its attention block when present."""
    for i, block in enumerate(level.block):
        h = block(h, None)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """Image [B, in_channels, S, S] -> latent [B, z_channels, S/f, S/f]."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, mults = cfg.hidden_channels, cfg.channel_mult
        self.patch_size = cfg.patch_size
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch_size**2, ch, 3, padding=1)
        in_mults = (1, *mults)
        res = cfg.resolution // cfg.patch_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(mults):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_mults[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(_resnet(block_in, ch * mult, cfg.dropout))
                block_in = ch * mult
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(mults) - 1:
                level.downsample = Downsample(block_in, with_conv=True)
                res //= 2
            self.down.append(level)
        self.mid = _mid_block(block_in, cfg)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(F.pixel_unshuffle(x, self.patch_size) if self.patch_size > 1 else x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, S/f, S/f] -> image [B, in_channels, S, S]; `up` is indexed like the encoder's `down`."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, mults = cfg.hidden_channels, cfg.channel_mult
        block_in = ch * mults[-1]
        res = cfg.grid_size
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid_block(block_in, cfg)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mults))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(_resnet(block_in, ch * mults[i], cfg.dropout))
                block_in = ch * mults[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in, with_conv=True)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.patch_size = cfg.patch_size
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels * cfg.patch_size**2, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(h, self.patch_size) if self.patch_size > 1 else h


class VQOutput(NamedTuple):
    """A tokenizer's forward: the reconstruction and what the quantizer gave on the way."""

    reconstruction: Tensor  # [B, C, S, S] in the model's value range (unclamped)
    quantized: QuantizerOutput


class VQTokenizer(nn.Module):
    """A VQGAN plus its preprocessing policy: images <-> LongTensor[B, tokens_per_image].

    `forward` is the training path (reconstruction + VQ loss); `encode`/`decode`
    are the inference API every other stage uses. Construct from a `VQGANConfig`,
    or load any supported checkpoint with `tokenizer.load`.
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantize: VectorQuantizer | FiniteScalarQuantizer = (
            FiniteScalarQuantizer(config.fsq_levels)
            if config.fsq_levels
            else VectorQuantizer(config.codebook_size, config.embed_dim, config.commitment_cost, config.l2_normalized_codes)
        )

    # -- facts callers need -------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config.resolution

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def digest(self) -> str:
        """Which tokenizer made a set of tokens (`weights.module_digest`), whatever file format or path it was
        loaded from. Token shards, sentence shards and LVM checkpoints carry it."""
        return weights.module_digest(self)

    def identity(self, name: str | None = None) -> dict:
        """What a model trained on this tokenizer's tokens records about it (`name`: how it was given). The weights'
        digest does not cover how images become pixels and codes become lookups: the same weights under another
        resize, value range or lookup give other tokens, hence `preprocessing`."""
        cfg = self.config
        return {"name": None if name is None else str(name), "digest": self.digest(),
                "tokens_per_image": self.tokens_per_image, "codebook_size": self.codebook_size,
                "preprocessing": {"resize": cfg.resize, "value_range": list(cfg.value_range),
                                  "l2_normalized_codes": cfg.l2_normalized_codes}}

    # -- training path ------------------------------------------------------
    def forward(self, x: Tensor) -> VQOutput:
        """Reconstruct `x` (model value range) through the quantizer, with gradients."""
        quantized = self.quantize(self.quant_conv(self.encoder(x)))
        return VQOutput(self.decoder(self.post_quant_conv(quantized.z_q)), quantized)

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """Quantized latents [B, embed_dim, h, w] -> image in the model's value range (unclamped)."""
        return self.decoder(self.post_quant_conv(z_q.to(self.post_quant_conv.weight.dtype)))

    # -- inference API ------------------------------------------------------
    def preprocess(self, image: ImageLike) -> Tensor:
        """Any image (PIL, numpy, uint8 tensor; any size or mode) -> FloatTensor[3, S, S] in the model's range."""
        return preprocess_image(image, self.config.resolution, self.config.resize, self.config.value_range)

    def seen(self, images: Sequence[ImageLike]) -> Tensor:
        """Images as the tokenizer sees them (its resize policy and size), uint8 Tensor[B, 3, S, S]: what a
        decoded prediction should be compared with and shown beside."""
        pixels = torch.stack([from_value_range(self.preprocess(image), self.config.value_range) for image in images])
        return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)

    @torch.no_grad()
    def encode_pixels(self, pixels: Tensor) -> Tensor:
        """Preprocessed batch [B, 3, S, S] -> LongTensor[B, tokens_per_image].

        Runs in the module's dtype, or under whatever autocast the caller opened
        (bf16 on CUDA for throughput); the nearest-code search is always float32.
        """
        S = self.config.resolution
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, S, S) or not pixels.is_floating_point():
            raise ValueError(f"expected preprocessed pixels, a float batch [B, 3, {S}, {S}] (tok.preprocess), got "
                             f"{pixels.dtype} {list(pixels.shape)}")  # another size gave more tokens than an image has
        if not len(pixels):
            return torch.empty(0, self.tokens_per_image, dtype=torch.long, device=self.device)
        weight = self.encoder.conv_in.weight
        channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format  # follow the module
        x = pixels.to(device=weight.device, dtype=weight.dtype, memory_format=memory_format)
        return self.quantize.codes(self.quant_conv(self.encoder(x)))

    def encode(self, images: Sequence[ImageLike] | Tensor) -> Tensor:
        """Images (a list of any supported image, or uint8 Tensor[B, C, H, W]) -> LongTensor[B, tokens_per_image]."""
        if not len(images):
            return torch.empty(0, self.tokens_per_image, dtype=torch.long, device=self.device)
        return self.encode_pixels(torch.stack([self.preprocess(image) for image in images]))

    @torch.no_grad()
    def decode_pixels(self, tokens: Tensor) -> Tensor:
        """LongTensor[B, N] -> FloatTensor[B, 3, S, S] in [0, 1] (clamped)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.tokens_per_image or tokens.is_floating_point():
            raise ValueError(f"expected integer tokens [B, {self.tokens_per_image}] (this tokenizer's tokens per image), "
                             f"got {tokens.dtype} {list(tokens.shape)}")
        tokens = tokens.to(self.device).long().clamp(0, self.codebook_size - 1)
        side = int(round(tokens.shape[1] ** 0.5))
        image = self.decode_latents(self.quantize.lookup(tokens, (side, side)))
        return from_value_range(image.float(), self.config.value_range).clamp(0, 1)

    def decode(self, tokens: Tensor) -> Tensor:
        """LongTensor[B, N] -> uint8 Tensor[B, 3, S, S]; ids outside the codebook are clamped into it first."""
        return (self.decode_pixels(tokens) * 255).round().to(torch.uint8)

    def save(self, directory: str | Path) -> Path:
        """Write `model.safetensors` (float32) + `config.json`, readable by `tokenizer.load`. Each file is
        written atomically, the config last: a killed save leaves the folder's earlier files whole (or no config,
        which `tokenizer.load` names), never a cut weights file beside a config."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(tmp_path(directory / WEIGHTS_NAME)), metadata={"format": FORMAT_NAME})
        umask_mode(tmp_path(directory / WEIGHTS_NAME))
        commit_file(directory / WEIGHTS_NAME)
        meta = {"format": FORMAT_NAME, "version": 1, "config": self.config.to_dict()}
        with atomic_write(directory / CONFIG_NAME, "w") as file:
            file.write(json.dumps(meta, indent=2) + "\n")
        return directory
