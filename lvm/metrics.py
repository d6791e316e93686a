"""The numbers the evaluation and the prompt CLI report, each defined once.

Perplexity follows the release: per-example perplexity is exp(mean NLL over the
scored tokens), and the headline is the arithmetic mean of those; exp(mean NLL)
over all examples is reported beside it because it is the usual LM figure and is
less dominated by a few hard examples. Pixel metrics are on [0, 1] intensities,
as the release's MSE is. Both are one-liners in torch, so no metrics library.

The PSNR here is that of a mean MSE (finite unless every prediction is exact). `tokenizer.evaluate` reports
instead the mean of per-image PSNRs, capped at 100 dB, as tokenizer papers do: on the same images the two
differ (by ~9 dB for one good and one poor image), so compare a predicted frame's PSNR with the tokenizer's
reconstruction through `lvm.evaluate`'s own `copy_last_psnr` and `model_psnr`, not across the two reports.
"""

from __future__ import annotations

import torch


def perplexities(nlls: torch.Tensor) -> dict[str, float]:
    """Summary of per-example mean NLLs [N] (nats): mean of per-example perplexities and exp(mean NLL)."""
    nlls = nlls.double()
    return {
        "mean_perplexity": nlls.exp().mean().item(),
        "perplexity_of_mean_nll": nlls.mean().exp().item(),  # inf past ~709 nats, where math.exp raises
        "mean_nll": nlls.mean().item(),
        "count": int(nlls.numel()),
    }


def _unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float64 in [0, 1]; float input is taken to be in [0, 1] already."""
    return images.double() / 255.0 if images.dtype == torch.uint8 else images.double()


def pixel_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image MSE [B] between images [B, 3, H, W] (uint8 or [0, 1] float), on [0, 1] intensities."""
    return (_unit(pred) - _unit(target)).square().flatten(1).mean(1)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for [0, 1] intensities from MSE; identical images give +inf."""
    return -10.0 * torch.log10(mse)
