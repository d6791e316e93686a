"""Tokenize pipeline images/s (decode + resize in workers, batched encoding, tar writing) against the encoder alone.

    python benchmarks/bench_tokenize.py                          # CPU, tiny tokenizer (configs/vqgan_tiny.yaml)
    python benchmarks/bench_tokenize.py --gpu                    # CUDA, released-LVM-shaped tokenizer, bf16
    python benchmarks/bench_tokenize.py --gpu --shards laion/    # your own img2dataset shards

Input (unless --shards): img2dataset-layout tars of real JPEGs (quality 90, `--jpeg-side` px square
random crops of scikit-image's bundled photos), at most 500 per tar and at least two tars per worker
(workers read whole tars), so decoding costs what it costs on LAION.
The pipeline figure is `python -m lvm.tokenize`'s own count (images written / wall time from the first
shard opened, worker start-up included). The anchor, measured in the same run on the same device with
the same batch size: encoder-only images/s (`encode_pixels` on a preprocessed batch already in memory,
bf16 autocast + channels_last on CUDA, codes copied back to the host). Goal (issue 3): pipeline >= 80%
of encoder-only, i.e. the loader never starves the GPU. The GPU tokenizer has random weights: speed
does not depend on them.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path

import skimage
import torch
from omegaconf import OmegaConf
from PIL import Image

import tokenizer
from common.options import HelpFormatter, usable_cores
from lvm.tokenize.pipeline import Encoder, Job, Options, run

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vqgan_tiny.yaml"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg"]


def make_tokenizer(gpu: bool, folder: Path) -> Path:
    """A random-weight tokenizer saved for `tokenizer.load`: the released LVM shape on GPU, the tiny one on CPU."""
    torch.manual_seed(0)
    if gpu:
        config = tokenizer.VQGANConfig()  # defaults = the released LVM tokenizer
    else:
        config = tokenizer.VQGANConfig(**OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model.init_args.tokenizer))
    return tokenizer.VQTokenizer(config).save(folder / "tokenizer")


def make_shards(folder: Path, images: int, side: int, per_tar: int) -> Path:
    """img2dataset-layout tars of JPEG crops of real photos (key.jpg + key.json + key.txt), one process per core:
    8,000 JPEGs of 512 px took ~64 s on one, of the GPU run's few minutes."""
    out = folder / "shards"
    out.mkdir()
    firsts = range(0, images, per_tar)
    with multiprocessing.Pool(min(len(firsts), usable_cores())) as pool:
        pool.starmap(_write_shard, [(out, first, min(per_tar, images - first), side) for first in firsts])
    return out


def _write_shard(out: Path, first: int, count: int, side: int) -> None:
    """The tar of images first .. first + count - 1, drawn from a generator of its own (the same whatever the pool)."""
    rng = random.Random(first)
    photos = [Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB") for name in PHOTOS]
    with tarfile.open(out / f"{first:09d}.tar", "w") as tar:
        for i in range(first, first + count):
            photo = rng.choice(photos)
            crop = rng.randint(min(photo.size) // 3, min(photo.size))
            x, y = rng.randint(0, photo.width - crop), rng.randint(0, photo.height - crop)
            buffer = io.BytesIO()
            photo.crop((x, y, x + crop, y + crop)).resize((side, side), Image.BICUBIC).save(buffer, "JPEG", quality=90)
            for ext, data in (("jpg", buffer.getvalue()), ("json", b'{"caption": "a photo"}'), ("txt", b"a photo")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def encoder_only(tok_path: Path, device: str, batch_size: int, variants: int, seconds: float) -> float:
    """Images/s of the encoder alone, with each image costing `variants` encodes as in the pipeline."""
    tok = tokenizer.load(tok_path, device=device)
    encode = Encoder(tok)
    x = torch.rand(batch_size * variants, 3, tok.image_size, tok.image_size)
    if encode.cuda:
        x = x.pin_memory()
    encode(x)  # warm-up (cuDNN heuristics, allocator)
    batches, start = 0, time.perf_counter()
    while batches < 3 or time.perf_counter() - start < seconds:
        encode(x)  # ends with a device->host copy, so the clock sees finished work
        batches += 1
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="CUDA + the released-LVM-shaped tokenizer")
    parser.add_argument("--shards", help="img2dataset tars to tokenize (default: synthetic, in a temp folder)")
    parser.add_argument("--images", type=int, help="synthetic images (default: 20000 GPU, 300 CPU)")
    parser.add_argument("--jpeg-side", type=int, help="synthetic JPEG side in px (default: 512 GPU, 256 CPU)")
    parser.add_argument("--batch-size", type=int, help="default: 256 GPU, 32 CPU")
    parser.add_argument("--workers", type=int, help="default: 16 GPU, 2 CPU")
    parser.add_argument("--derive", default="", help="e.g. gray,masked: each image then costs 3 encodes")
    parser.add_argument("--jpeg-draft", action="store_true", help="as `python -m lvm.tokenize --jpeg-draft`")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads of the main process (default: as the tokenize job sets them)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    gpu = args.gpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device")
    images = args.images or (20000 if gpu else 300)
    side = args.jpeg_side or (512 if gpu else 256)
    batch_size = args.batch_size or (256 if gpu else 32)
    workers = args.workers if args.workers is not None else (16 if gpu else 2)
    derive = tuple(v for v in ("gray", "masked") if v in args.derive.split(","))
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the tokenize job then leaves the setting alone
        torch.set_num_threads(args.threads)
    device = "cuda" if gpu else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tok_path = make_tokenizer(gpu, tmp_path)
        per_tar = max(1, min(500, images // (2 * max(workers, 1))))
        shards = args.shards or str(make_shards(tmp_path, images, side, per_tar))
        options = Options(derive=derive, jpeg_draft=args.jpeg_draft)
        job = Job(shards=[shards], out=tmp_path / "tokens", tokenizer=str(tok_path), options=options,
                  batch_size=batch_size, workers=workers, device=device)
        summary = run(job)
        # After the job: on CPU it has set the torch threads the anchor must use too.
        anchor = encoder_only(tok_path, device, batch_size, 1 + len(derive), seconds=10 if gpu else 5)
    pipeline = summary.images / summary.wall_s
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"device: {name}; tokenizer: {'released-LVM-shaped' if gpu else 'tiny'}; batch {batch_size}; "
          f"{workers} workers; {summary.images} images ({'' if args.shards else f'{side}px JPEG, '}derive {derive or 'none'}"
          f"{', jpeg-draft' if args.jpeg_draft else ''})")
    print(f"encoder only: {anchor:,.1f} images/s")
    print(f"pipeline:     {pipeline:,.1f} images/s = {pipeline / anchor:.0%} of encoder-only")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "images": summary.images, "jpeg_side": None if args.shards else side,
                       "batch_size": batch_size, "workers": workers, "jpeg_draft": args.jpeg_draft,
                       "pipeline_images_per_s": pipeline, "encoder_only_images_per_s": anchor}, f, indent=2)


if __name__ == "__main__":
    main()
