"""Nearest-code vector quantizer: the discrete bottleneck that turns latents into tokens.

`FiniteScalarQuantizer` (at the end) is the codebook-free alternative with the same interface.

Two lookups share one module: the plain Euclidean nearest code that the released
taming / open-muse / LVM checkpoints were trained with, and LlamaGen's variant
that l2-normalises latents and codes (cosine lookup), which keeps codebook usage
high with low-dimensional codes. Distances are always computed in float32 with
autocast off, so tokens do not depend on the encoder's compute dtype downstream
of the latent, and ties resolve the same way as the original code (argmin takes
the first minimum).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuantizerOutput(NamedTuple):
    """What a quantizer's forward gives the training loop."""

    z_q: Tensor  # [B, C, h, w], straight-through estimator (gradients flow to the encoder)
    indices: Tensor  # [B, h*w] int64, row-major over the code grid
    loss: Tensor  # codebook + beta * commitment, scalar
    latents: Tensor  # [B*h*w, C] float32 latents as looked up (normalised for the cosine variant), detached


class VectorQuantizer(nn.Module):
    """Codebook of `codebook_size` vectors of size `embed_dim` (`embedding.weight` as in taming/open-muse)."""

    def __init__(self, codebook_size: int, embed_dim: int, commitment_cost: float = 0.25, l2_normalized: bool = False) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.commitment_cost = commitment_cost
        self.l2_normalized = l2_normalized
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)  # taming's init
        if l2_normalized:  # LlamaGen: start on the unit sphere, else tiny norms make every update a jump
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def _codebook(self) -> Tensor:
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_normalized else weight

    def _flatten(self, z: Tensor) -> Tensor:
        """[B, C, h, w] -> [B*h*w, C] in float32 (normalised for the cosine variant)."""
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        return F.normalize(flat, dim=-1) if self.l2_normalized else flat

    def _nearest(self, flat: Tensor, codebook: Tensor) -> Tensor:
        # ||z||^2 + ||e||^2 - 2 z.e in one addmm, the same arithmetic as open-muse's VQGANModel.
        distances = torch.addmm(
            flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None, :], flat, codebook.t(), alpha=-2.0
        )
        return distances.argmin(dim=1)

    def codes(self, z: Tensor) -> Tensor:
        """Nearest code of each latent position: [B, C, h, w] -> LongTensor[B, h*w]."""
        with torch.autocast(z.device.type, enabled=False):
            return self._nearest(self._flatten(z), self._codebook()).view(z.shape[0], -1)

    def lookup(self, indices: Tensor, grid: tuple[int, int]) -> Tensor:
        """Code vectors for token ids: LongTensor[B, h*w] -> [B, C, h, w] (float32)."""
        vectors = F.embedding(indices, self._codebook())  # [B, h*w, C]
        return vectors.view(indices.shape[0], grid[0], grid[1], self.embed_dim).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize for training: straight-through z_q, token ids and the VQ loss.

        loss = ||sg[z] - e||^2 (moves codes) + beta * ||z - sg[e]||^2 (commits the encoder),
        the VQ-VAE formulation LlamaGen uses (taming weights the two terms the other way round).
        """
        with torch.autocast(z.device.type, enabled=False):
            flat = self._flatten(z)
            codebook = self._codebook()
            indices = self._nearest(flat.detach(), codebook.detach())
            quantized = F.embedding(indices, codebook)
            loss = F.mse_loss(quantized, flat.detach()) + self.commitment_cost * F.mse_loss(flat, quantized.detach())
            quantized = flat + (quantized - flat).detach()
        b, _, h, w = z.shape
        z_q = quantized.view(b, h, w, self.embed_dim).permute(0, 3, 1, 2).contiguous()
        return QuantizerOutput(z_q, indices.view(b, -1), loss, flat.detach())

    @torch.no_grad()
    def restart(self, dead: Tensor, latents: Tensor) -> int:
        """Move the codes flagged in `dead` [codebook_size] onto random `latents` [N, C] of the current batch.

        Codebook restarts (Jukebox; `threshold_ema_dead_code` in vector-quantize-pytorch): a code no latent
        picks gets no gradient and stays dead, which is how short or small runs collapse onto a few codes.
        Returns the number of codes moved.
        """
        index = dead.nonzero().squeeze(1)
        if index.numel():
            pick = torch.randint(0, latents.shape[0], (index.numel(),), device=latents.device)
            # A little noise so codes restarted onto the same latent do not tie forever.
            noise = torch.randn(index.numel(), latents.shape[1], device=latents.device)
            self.embedding.weight[index] = (latents[pick] + 0.01 * latents.std() * noise).to(self.embedding.weight.dtype)
        return int(index.numel())


def codebook_stats(counts: Tensor) -> tuple[float, float]:
    """Usage (fraction of codes used at least once) and perplexity (exp entropy) of a code histogram."""
    counts = counts.float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum()
    return (counts > 0).float().mean().item(), entropy.exp().item()


class FiniteScalarQuantizer(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE made simple"): no codebook.

    Channel i of the latent is squashed into (-(L_i-1)/2, (L_i-1)/2) by a shifted tanh and rounded
    (straight-through), giving one of L_i levels; the token is the mixed-radix number of the levels
    (channel 0 least significant). There is no codebook to learn or collapse and no VQ loss. Written
    here rather than taken from vector-quantize-pytorch: it is twenty lines and must match our
    `codes`/`lookup`/`forward` interface and float32 rule.
    """

    def __init__(self, levels: list[int]) -> None:
        super().__init__()
        self.levels = list(levels)
        self.codebook_size = math.prod(levels)
        self.embed_dim = len(levels)
        self._radix = [math.prod(levels[:i]) for i in range(len(levels))]

    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Made per call, not buffers: loaders build modules on the meta device, where buffers stay empty.
        return torch.tensor(self.levels, dtype=torch.float32, device=device), torch.tensor(self._radix, device=device)

    def _rounded(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """[B, C, h, w] -> (levels with straight-through gradients, [B*h*w, C] float32 in -L/2..L/2; integer ids)."""
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        levels, radix = self._constants(z.device)
        half_range = (levels - 1) * (1 + 1e-3) / 2  # a hair wider so the extreme levels are reachable
        offset = (levels % 2 == 0).float() * 0.5  # even L: levels sit at half-integers, shifted onto integers
        bounded = torch.tanh(flat + torch.atanh(offset / half_range)) * half_range - offset
        rounded = bounded.round()
        ids = ((rounded + levels // 2).long() * radix).sum(1)
        return bounded + (rounded - bounded).detach(), ids

    def _to_grid(self, flat: Tensor, b: int, h: int, w: int) -> Tensor:
        """[B*h*w, C] levels -> [B, C, h, w] in [-1, 1] (divided by L // 2, as in the paper)."""
        return (flat / (self._constants(flat.device)[0] // 2)).view(b, h, w, self.embed_dim).permute(0, 3, 1, 2).contiguous()

    def codes(self, z: Tensor) -> Tensor:
        """Token id of each latent position, its rounded levels read as digits: [B, C, h, w] -> LongTensor[B, h*w]."""
        with torch.autocast(z.device.type, enabled=False):
            return self._rounded(z)[1].view(z.shape[0], -1)

    def lookup(self, indices: Tensor, grid: tuple[int, int]) -> Tensor:
        """Quantized latents for token ids, the digits back to levels: LongTensor[B, h*w] -> [B, C, h, w] (float32)."""
        levels, radix = self._constants(indices.device)
        digits = (indices.reshape(-1, 1) // radix) % levels.long() - levels.long() // 2
        return self._to_grid(digits.float(), indices.shape[0], grid[0], grid[1])

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            flat, ids = self._rounded(z)
        b, _, h, w = z.shape
        return QuantizerOutput(self._to_grid(flat, b, h, w), ids.view(b, -1), flat.new_zeros(()), flat.detach())
