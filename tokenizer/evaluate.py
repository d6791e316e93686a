"""Reconstruction quality of a tokenizer on a folder of held-out images.

    python -m tokenizer.evaluate --tokenizer PATH --images DIR [--batch-size 32] [--json out.json]

Each image goes through the tokenizer's own preprocessing, is encoded to tokens and
decoded back; PSNR and SSIM compare the reconstruction with the preprocessed input
(both in [0, 1] at the tokenizer's resolution). Codebook usage and perplexity come
from the histogram of all tokens. rFID is computed only when torch-fidelity and its
Inception weights are already on disk (nothing is downloaded); otherwise it is
reported as skipped. Unreadable images are skipped, counted and listed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

import tokenizer
import weights
from common.errors import UserError, exit_on, leave_stop_signals_to_main, warn
from common.files import json_text, output_file, write_atomic
from common.options import HelpFormatter, add_device_arg, add_tokenizer_arg, at_least, default_workers
from tokenizer.data import image_files
from tokenizer.preprocess import UNREADABLE_IMAGE, from_value_range
from tokenizer.quantizer import codebook_stats

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights


class _Images(Dataset):
    """Preprocessed images; an unreadable file yields (None, path) so the run goes on."""

    def __init__(self, files: list[Path], tok: tokenizer.VQTokenizer) -> None:
        self.files, self.tok = files, tok

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor | None, str]:
        try:
            with Image.open(self.files[index]) as image:  # turned by EXIF, as lvm.tokenize and training see it
                return self.tok.preprocess(image), str(self.files[index])
        except UNREADABLE_IMAGE:
            return None, str(self.files[index])


def _collate(items: list[tuple[Tensor | None, str]]) -> tuple[Tensor | None, list[str]]:
    good = [x for x, _ in items if x is not None]
    return (torch.stack(good) if good else None), [path for x, path in items if x is None]


def _fid_metric(device: torch.device) -> tuple[Any, str]:
    """torchmetrics' FID when torch-fidelity and cached Inception weights exist, else (None, reason)."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return None, "torch-fidelity is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not weights.is_file():
        return None, f"Inception weights not found at {weights}"
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048).to(device), ""


MAX_PSNR = 100.0
"""Where an image's PSNR is capped: an exact reconstruction (a blank frame, after the clamp) has infinite PSNR,
which made the mean over a whole evaluation infinite and its JSON invalid."""


def image_psnr(recon: Tensor, target: Tensor) -> Tensor:
    """PSNR [B] in dB of each image in [0, 1] ([B, 3, H, W]), at most `MAX_PSNR`."""
    return peak_signal_noise_ratio(recon, target, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp(max=MAX_PSNR)


@torch.no_grad()
def evaluate(
    tok: tokenizer.VQTokenizer, files: list[Path], batch_size: int = 32, num_workers: int = 2, progress: bool = True
) -> dict[str, Any]:
    """PSNR/SSIM (means over images), codebook usage/perplexity, rFID when possible, skipped files."""
    loader = DataLoader(_Images(files, tok), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        worker_init_fn=leave_stop_signals_to_main)
    fid, fid_skip_reason = _fid_metric(tok.device)
    counts = torch.zeros(tok.codebook_size, dtype=torch.long)
    psnr_sum = ssim_sum = 0.0
    images, skipped = 0, []
    for pixels, bad in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        skipped += bad
        if pixels is None:
            continue
        tokens = tok.encode_pixels(pixels)
        counts += torch.bincount(tokens.flatten().cpu(), minlength=tok.codebook_size)
        target = from_value_range(pixels.to(tok.device).float(), tok.config.value_range).clamp(0, 1)
        recon = tok.decode_pixels(tokens)
        psnr_sum += float(image_psnr(recon, target).sum())
        ssim_sum += float(structural_similarity_index_measure(recon, target, data_range=1.0, reduction="none").sum())
        if fid is not None:
            fid.update((target * 255).round().to(torch.uint8), real=True)
            fid.update((recon * 255).round().to(torch.uint8), real=False)
        images += len(pixels)
    usage, perplexity = codebook_stats(counts)
    result: dict[str, Any] = {
        "images": images,
        "psnr": psnr_sum / max(images, 1),
        "ssim": ssim_sum / max(images, 1),
        "codebook_usage": usage,
        "codebook_size": tok.codebook_size,
        "perplexity": perplexity,
        "rfid": float(fid.compute()) if fid is not None and images > 1 else None,
        "skipped": skipped,
    }
    if fid is None:
        result["rfid_skipped"] = fid_skip_reason
    return result


@exit_on
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.evaluate", description=__doc__, formatter_class=HelpFormatter)
    add_tokenizer_arg(parser, weights.DEFAULT_TOKENIZER)
    parser.add_argument("--config", default=None, help="yaml of a taming .ckpt when not beside it")
    parser.add_argument("--images", required=True, type=Path, help="folder of held-out images (searched recursively)")
    parser.add_argument("--batch-size", type=at_least(1), default=32, help="images per encode/decode pass")
    parser.add_argument("--workers", type=at_least(0), default=default_workers(), help="DataLoader worker processes (decoding)")
    parser.add_argument("--limit", type=at_least(1), default=None, help="evaluate only the first N images (sorted by path)")
    add_device_arg(parser)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.json:
        output_file(args.json, "--json")
    tok = tokenizer.load(args.tokenizer, device=args.device, config=args.config)
    files = image_files(args.images) if args.images.is_dir() else []
    if not files:
        raise UserError(args.images, "no image files found")
    result = evaluate(tok, files[: args.limit], args.batch_size, args.workers)
    for path in result["skipped"]:
        warn(f"{path}: unreadable image skipped")
    if not result["images"]:
        raise UserError(args.images, f"none of its {len(result['skipped'])} image files could be read")
    if args.json:
        write_atomic(args.json, json_text(result))
    rfid = f"rFID {result['rfid']:.2f}" if result["rfid"] is not None else f"rFID skipped ({result.get('rfid_skipped', 'too few images')})"
    print(
        f"{result['images']} images: PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}, "
        f"codebook usage {100 * result['codebook_usage']:.2f}% (perplexity {result['perplexity']:.1f}), {rfid}, "
        f"{len(result['skipped'])} skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
