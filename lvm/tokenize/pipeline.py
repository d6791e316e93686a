"""The tokenize job: ranks split the units, DataLoader workers decode, the main process encodes and writes.

Parallelism is per unit: worker w of a rank reads units w, w + W, ... from start to end and cuts
each into batches of at most `batch_size` images that never span two units. A unit's tokens
therefore depend only on its own inputs, the batch size and the device, never on which other
units ran beside it, so a resumed run writes exactly the bytes an uninterrupted run would.
Workers hold no model (only the cheap preprocessing); the model stays in the main process on
`cuda:LOCAL_RANK` (bf16 autocast, channels_last) or the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

import tokenizer
import weights
from common.errors import leave_stop_signals_to_main, warn
from common.files import spec_holding, within
from common.options import decoding_start_method, default_workers, usable_cores
from common.progress import Progress, Summary, log
from common.ranks import pick_device, ranks_from_env, worker_share
from common.vocab import CODEBOOK_SIZE
from lvm.palette import PALETTE_SEED
from lvm.tokenize import TokenizeError
from lvm.tokenize.decode import DecodeOptions, Picture, Skip, read_batches
from lvm.tokenize.derive import MASK_RECIPE, VARIANTS, apply_mask, gray, mask_params
from lvm.tokenize.sources import Unit, default_out, find_units, leftover_shards, repeated_key
from lvm.tokenize.writer import ShardWriter, recorded, shard_paths, shard_state
from sentences.formats import ORIGINAL, token_report
from tokenizer.preprocess import finish_preprocessing

VIDEO_RESIZES = ("tokenizer", "release")
"""How ``--video-resize`` brings video frames to the tokenizer's size: by the tokenizer's own resize policy (the
released tokenizer's: bicubic with antialiasing, as for images), or as the LVM release tokenized video, with
OpenCV's bilinear resize without antialiasing (``tokenizer.preprocess.resize_square``'s 'release_video')."""


@dataclass(frozen=True)
class Options:
    """Everything besides the inputs that decides what a shard contains (part of its fingerprint)."""

    derive: tuple[str, ...] = ()  # subset of VARIANTS; stored in VARIANTS order whatever order is given
    video_stride: int = 1
    label_palette: bool = False
    seed: int = 0
    jpeg_draft: bool = False  # decode large JPEGs at reduced scale (faster, slightly different pixels)
    video_resize: str = "tokenizer"  # video frames resized by the tokenizer's policy, or "release": as the LVM release

    def __post_init__(self) -> None:
        unknown = sorted(set(self.derive) - set(VARIANTS))
        if unknown:
            raise TokenizeError(f"unknown derived variant {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
        if self.video_stride < 1:
            raise TokenizeError("--video-stride must be at least 1")
        if self.video_resize not in VIDEO_RESIZES:
            raise TokenizeError(f"--video-resize: {self.video_resize!r}, choose from {', '.join(VIDEO_RESIZES)}")
        object.__setattr__(self, "derive", tuple(v for v in VARIANTS if v in self.derive))

    def fingerprinted(self, videos: bool) -> dict:
        """The options as the fingerprint of a shard of video files (``videos``) or of images records them.

        An option that cannot change a shard is recorded at its default, so that changing it redoes nothing that
        would come out byte-identical (a new ``--video-stride`` re-tokenized every image shard): ``video_stride``
        for image shards, ``seed`` without ``--derive masked``. ``video_resize`` is left out where it changes
        nothing or has its default, so that shards made before the option existed stay complete."""
        options = asdict(self)
        if not videos:
            options["video_stride"] = Options.video_stride
        if "masked" not in self.derive:
            options["seed"] = Options.seed
        if not videos or options["video_resize"] == "tokenizer":
            del options["video_resize"]
        return options


@dataclass
class Job:
    """One `python -m lvm.tokenize` invocation."""

    shards: list[str]
    out: Path | None = None  # default: tokens/<name of the first source> (sources.default_out)
    tokenizer: str = weights.DEFAULT_TOKENIZER  # anything tokenizer.load reads, a hub id included
    options: Options = field(default_factory=Options)
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    images_per_shard: int = 1000
    videos_per_shard: int = 8
    frame_folders: bool = False  # image folders are frame sequences (the frame indices enter each unit's digest)
    max_shards: int | None = None  # stop after this many shards (this rank); a rerun continues
    device: str | None = None  # default: cuda:LOCAL_RANK when CUDA is available, else cpu


@dataclass(frozen=True)
class Resize:
    """The tokenizer's preprocessing after colour conversion, as a small picklable callable for workers.

    `tokenizer.preprocess.finish_preprocessing`, `preprocess_image`'s steps after the colour conversion, which the
    tokenize step makes itself first (`to_rgb_float`) because the derived images are made in between.
    """

    size: int
    mode: str
    value_range: tuple[float, float]
    video_mode: str | None = None  # the resize mode of video-file frames (None: ``mode``)

    def mode_for(self, video_file: bool) -> str:
        return self.video_mode if video_file and self.video_mode else self.mode

    def __call__(self, x01: Tensor, video_file: bool = False) -> Tensor:
        return finish_preprocessing(x01, self.size, self.mode_for(video_file), self.value_range)


@dataclass
class Batch:
    """Up to batch_size images of one unit, in unit order, and the inputs skipped since the last batch."""

    unit: int
    keys: list[str]
    metas: list[bytes]
    pixels: Tensor  # [(1 + len(derive)) * B, 3, S, S]: the B originals, then B of each derived variant
    skips: list[Skip]
    last: bool  # the unit's final batch: commit the shard after it

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) so host->GPU copies run asynchronously."""
        self.pixels = self.pixels.pin_memory()
        return self


def meta_bytes(meta: dict) -> bytes:
    """A sample's json as UTF-8, its text as is; a string UTF-8 cannot hold (a file name that is not UTF-8, read
    with Python's surrogate escapes, or a caption cut inside an emoji) is written as JSON `\\u` escapes, which
    read back to the same string."""
    try:
        return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


class UnitBatches(IterableDataset):
    """Batches of preprocessed images (and derived variants), unit after unit, split over workers."""

    def __init__(self, units: list[Unit], options: Options, resize: Resize, batch_size: int) -> None:
        self.units, self.options, self.resize, self.batch_size = units, options, resize, batch_size
        self.decode = DecodeOptions(options.video_stride, options.label_palette, resize.size if options.jpeg_draft else None)

    def __iter__(self):
        for index in worker_share(len(self.units)):
            for rows, skips, last in read_batches(self.units[index], self.decode, self.batch_size, self._prepare):
                yield self._batch(index, rows, skips, last)

    def _prepare(self, picture: Picture) -> tuple[str, bytes, list[Tensor]]:
        meta = dict(picture.meta)
        images = [picture.pixels]
        for variant in self.options.derive:  # the order of the stacked batch, which `run` relies on
            if variant == "gray":
                images.append(gray(picture.pixels))
            else:
                meta["mask"] = mask_params(picture.key, self.options.seed)
                images.append(apply_mask(picture.pixels, meta["mask"], self.resize.mode_for(picture.video_file)))
        if self.options.label_palette:
            meta["label_palette"] = PALETTE_SEED
        return picture.key, meta_bytes(meta), [self.resize(image, picture.video_file) for image in images]

    def _batch(self, index: int, rows: list, skips: list[Skip], last: bool) -> Batch:
        variants = 1 + len(self.options.derive)
        if rows:
            pixels = torch.stack([row[2][v] for v in range(variants) for row in rows])
        else:
            pixels = torch.empty(0, 3, self.resize.size, self.resize.size)
        return Batch(index, [r[0] for r in rows], [r[1] for r in rows], pixels, skips, last)


def _load_tokenizer(path: str, device: torch.device) -> tokenizer.VQTokenizer:
    try:
        tok = tokenizer.load(path, device=device)
    except tokenizer.TokenizerLoadError as error:
        raise TokenizeError(str(error)) from None
    if tok.codebook_size > CODEBOOK_SIZE:  # found by sentences.build otherwise, after the whole job
        raise TokenizeError(path, f"codebook of {tok.codebook_size} codes does not fit the LVM's {CODEBOOK_SIZE} code "
                            f"ids (ids from {CODEBOOK_SIZE} are BOS, EOS and reserved: common/vocab.py)")
    return tok


class Encoder:
    """Batched encoding on the tokenizer's device: bf16 autocast and channels_last on CUDA.

    `start` queues a batch and returns at once on a GPU, `finish` waits for that batch's codes only: the tokenize loop
    writes one batch's codes while the GPU encodes the next (writing costs ~66 us an image on one core, 11-14% of
    the GPU's time at the rates docs/scaling.md plans for, if the GPU waited for it)."""

    def __init__(self, tok: tokenizer.VQTokenizer) -> None:
        self.tok = tok
        self.cuda = tok.device.type == "cuda"
        if self.cuda:
            tok.to(memory_format=torch.channels_last)  # encode_pixels follows the module's memory format

    def start(self, pixels: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
        """The batch's codes on the host once its event has passed (on a CPU: already)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            codes = self.tok.encode_pixels(pixels.to(self.tok.device, non_blocking=True))
        if not self.cuda:
            return codes.cpu(), None  # already there on a CPU; an MPS tensor has no .numpy()
        # Copied before the next batch's kernels are queued on the stream, so waiting for it does not wait for them.
        host = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True)
        host.copy_(codes, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.tok.device))  # the encoder's GPU: not the current one's by default
        return host, done

    @staticmethod
    def finish(started: tuple[Tensor, torch.cuda.Event | None]) -> np.ndarray:
        codes, done = started
        if done is not None:
            done.synchronize()
        return codes.numpy().astype(np.uint16)

    def __call__(self, pixels: Tensor) -> np.ndarray:
        return self.finish(self.start(pixels))


@dataclass
class Plan:
    """This rank's shards still to write, with their fingerprints."""

    units: list[Unit]
    fingerprints: list[str]
    already_done: int
    tokenizer: dict  # VQTokenizer.identity(), recorded in every shard's report
    images_earlier: int  # what the reports of the shards already done hold
    skipped_earlier: Counter  # and what they left out


def plan(job: Job, units: list[Unit], tok: tokenizer.VQTokenizer, rank: int, world: int, prefix: str) -> Plan:
    """This rank's share of the units, leaving out the shards already complete."""
    identity = tok.identity(job.tokenizer)
    # Config plus the weights' digest: a shard made by another tokenizer is never taken as done.
    made_by = {"config": tok.config.to_dict(), "weights": identity["digest"]}
    recipe = {"mask_recipe": MASK_RECIPE} if "masked" in job.options.derive else {}  # masks change with it
    settings = {
        videos: json.dumps({"options": job.options.fingerprinted(videos), "tokenizer": made_by, **recipe}, sort_keys=True)
        for videos in (False, True)
    }
    mine = units[rank::world]  # split before checking what is done, so every rank sees the same split
    fingerprints = [
        hashlib.sha1(f"{settings[u.kind == 'videos']}\n{u.inputs_digest()}".encode()).hexdigest() for u in mine
    ]
    states = [shard_state(job.out, u.name, f) for u, f in zip(mine, fingerprints)]
    todo = [i for i, state in enumerate(states) if state != "done"][: job.max_shards]
    stale = sum(states[i] == "stale" for i in todo)
    log(
        prefix,
        f"tokenize: {len(units)} shards in all, {len(mine)} for this rank, {states.count('done')} already complete"
        f"{f', {stale} made with other settings or inputs (redone)' if stale else ''}; doing {len(todo)} now with "
        f"{tok.tokens_per_image} tokens per image on {tok.device}, {job.workers} workers",
    )
    images, skipped = 0, Counter()
    for unit, state in zip(mine, states):
        if state == "done":
            held, left_out = recorded(shard_paths(job.out, unit.name)[1])
            images, skipped = images + held, skipped + left_out
    return Plan([mine[i] for i in todo], [fingerprints[i] for i in todo], states.count("done"), identity, images, skipped)


def _check_keys(units: list[Unit]) -> None:
    """Refuse two images of one folder with one key in two shards (`x.jpg` and `x.png` cut apart): the key would be
    written twice, and a `pairs` build would refuse the set. In one shard the second is a `duplicate_key` skip."""
    roots: dict[str, list[Unit]] = {}
    for unit in units:
        if unit.kind == "images":
            roots.setdefault(unit.root, []).append(unit)
    for root_units in roots.values():
        if found := repeated_key(root_units):
            key, earlier, this = found
            raise TokenizeError(this, f"has the key {key} of {earlier}, which another shard holds (keys drop the "
                                "suffix): the key would be written twice; rename one")


def _check_out(out: Path, specs: list[str], units: list[Unit]) -> None:
    """Refuse token shards among the inputs: every rerun, the documented resume included, would read the
    earlier shards as img2dataset tars, write a nested empty shard and count their images as skipped."""
    spec = spec_holding(out, specs)
    if spec is not None:
        raise TokenizeError(out, f"--out is inside the input folder {spec} (without --out: run from outside the "
                            "data, or give one); a rerun would read its token shards as inputs")
    # Found by a glob or brace pattern once they exist: tars under --out with a token-shard report beside them
    # (raw tars under --out, `--shards data/raw --out data`, are inputs like any other).
    tars = (item.path for unit in units if unit.kind == "tar" for item in unit.items)
    shard = next((t for t in tars if token_report(t).exists() and within(t, out.resolve())), None)
    if shard is not None:
        raise TokenizeError(out, f"--shards found a token shard of --out ({shard}): token shards would be read as "
                            "inputs; choose an --out outside the inputs")


def run(job: Job) -> Summary:
    """Tokenize this rank's share of the units; every input or option problem raises TokenizeError first."""
    rank, world, local_rank = ranks_from_env()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    if job.out is None:
        job = replace(job, out=default_out(job.shards))
        log(prefix, f"tokenize: writing token shards to {job.out} (no --out given)")
    if job.batch_size < 1 or job.workers < 0:
        raise TokenizeError("--batch-size must be at least 1, --workers at least 0")
    if job.out.exists() and not job.out.is_dir():
        raise TokenizeError(f"{job.out}: --out exists and is not a folder")
    units, missing = find_units(job.shards, job.images_per_shard, job.videos_per_shard, job.frame_folders)
    if missing:
        warn(f"{missing[0]}: named by --shards, does not exist"
             + (f" ({len(missing) - 1} more such)" if len(missing) > 1 else ""), prefix)
    _check_out(job.out, job.shards, units)
    _check_keys(units)
    leftovers = leftover_shards(job.out, units)
    if leftovers:
        raise TokenizeError(
            leftovers[0],
            f"left by an earlier run that cut the same inputs into more shards ({len(leftovers)} such); "
            "the sentence builder would read their images twice: remove them or choose another --out",
        )
    tok = _load_tokenizer(job.tokenizer, pick_device(job.device, local_rank))
    try:  # before any decoding: a folder that cannot be made fails in one line, not in the first shard's writer
        job.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TokenizeError(job.out, f"cannot create --out ({error.strerror})") from None
    todo = plan(job, units, tok, rank, world, prefix)
    if tok.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave the decoding workers their cores: oversubscribed, a 2-core machine encodes 3x slower.
        torch.set_num_threads(max(1, usable_cores() - job.workers))
    summary = Summary(shards_already_done=todo.already_done, images_earlier=todo.images_earlier,
                      skipped_earlier=todo.skipped_earlier)
    encode = Encoder(tok)
    video_mode = "release_video" if job.options.video_resize == "release" else None
    resize = Resize(tok.image_size, tok.config.resize, tok.config.value_range, video_mode)
    dataset = UnitBatches(todo.units, job.options, resize, job.batch_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=job.workers, pin_memory=encode.cuda,
                        worker_init_fn=leave_stop_signals_to_main,
                        multiprocessing_context=decoding_start_method(job.workers))
    progress = Progress(len(todo.units), prefix)
    writers: dict[int, ShardWriter] = {}  # one open shard per worker at most
    variants = (ORIGINAL, *job.options.derive)

    def write(batch: Batch, started: tuple | None) -> None:
        if batch.unit not in writers:
            unit = todo.units[batch.unit]
            writers[batch.unit] = ShardWriter(
                job.out, unit.name, [i.path for i in unit.items], todo.fingerprints[batch.unit], todo.tokenizer
            )
        writer = writers[batch.unit]
        if started is not None:
            codes = encode.finish(started).reshape(len(variants), len(batch.keys), -1)
            for row, (key, meta) in enumerate(zip(batch.keys, batch.metas)):
                writer.add(key, meta, {variant: codes[v, row] for v, variant in enumerate(variants)})
            summary.images += len(batch.keys)
            summary.derived += len(batch.keys) * (len(variants) - 1)
            summary.tokens += codes.size
        for skip in batch.skips:
            writer.skip(skip)
            summary.skipped[skip.reason] += 1
        if batch.last:
            writers.pop(batch.unit).commit()
            summary.shards_written += 1
        progress.update(images=len(batch.keys), shards=int(batch.last))

    held = None  # a batch being encoded, written once the next one is queued (in order: shards commit as before)
    for batch in loader:
        started = encode.start(batch.pixels) if batch.keys else None
        if held is not None:
            write(*held)
        held = (batch, started)
    if held is not None:
        write(*held)
    summary.wall_s = progress.elapsed()
    return summary
