"""The annotate job: ranks split the units, DataLoader workers decode and preprocess, the main process runs
the models and hands the maps to the writers.

The same units as `lvm.tokenize` (`find_units`: one per input tar, `images_per_shard` images of a folder
per unit), split round-robin over ranks before looking at what is done, so ranks never overlap and a rerun
with any number of ranks continues where the last stopped. Worker w of a rank reads units w, w + W, ...,
decodes each image once (`lvm.tokenize.decode`), shrinks it to the working size, computes the Canny edges
and each model's pixel_values; the main process runs the models on whole batches on `cuda:LOCAL_RANK`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from common.errors import leave_stop_signals_to_main, warn
from common.files import output_folder, spec_holding
from common.options import decoding_start_method, default_workers, names_of, usable_cores
from common.progress import Progress, log, skipped_text, wall_text
from common.ranks import pick_device, ranks_from_env, worker_share
from lvm.annotate import TASKS, AnnotateError, render
from lvm.annotate.models import Model, load, model_flag, predict, preprocess
from lvm.annotate.writer import UnitOutput, is_done
from lvm.tokenize import TokenizeError
from lvm.tokenize.decode import MEMBERS_ONLY, DecodeOptions, Picture, Skip, read_batches
from lvm.tokenize.sources import Unit, find_units, folder_within, image_keys, repeated_key
from lvm.tokenize.writer import recorded, shard_paths

MAX_PRINTED_SKIPS = 10  # per rank on stderr; every skip is in the unit reports


@dataclass
class Job:
    """One `python -m lvm.annotate` invocation."""

    images: list[str]
    out: Path
    tasks: tuple[str, ...]
    depth_model: str | None = None
    normals_model: str | None = None
    seg_model: str | None = None
    max_size: int = 512  # working size: longer side of the annotations (0: the images' own size)
    batch_size: int = 16
    workers: int = field(default_factory=default_workers)
    images_per_shard: int = 1000
    max_shards: int | None = None
    device: str | None = None


@dataclass
class Work:
    """A unit still to do on this rank, the tasks it lacks, and their fingerprints."""

    unit: Unit
    tasks: dict[str, str]  # task -> fingerprint


@dataclass
class Batch:
    """Up to batch_size images of one unit, with everything the main process needs but the models."""

    work: int
    keys: list[str]
    sizes: list[tuple[int, int]]  # (height, width) of each annotation
    edges: list[bytes]  # PNGs, when the unit lacks edges
    pixel_values: dict[str, Tensor]  # model role -> the processor's batch
    skips: list[Skip]
    last: bool

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True), which pins only tensors, mappings, sequences and objects with
        this method: without it the processors' batches stayed pageable and every copy to the GPU waited."""
        self.pixel_values = {role: pixels.pin_memory() for role, pixels in self.pixel_values.items()}
        return self


@dataclass
class Summary:
    """What this rank did."""

    images: int = 0
    written: Counter = field(default_factory=Counter)  # task -> annotations written
    units_written: int = 0
    units_done_before: int = 0
    images_earlier: int = 0  # in the units already complete, as their reports say
    skipped: Counter = field(default_factory=Counter)
    skipped_earlier: Counter = field(default_factory=Counter)  # in the reports of units already complete
    wall_s: float = 0.0

    def line(self) -> str:
        """The final one-line summary."""
        tasks = ", ".join(f"{task} {n:,}" for task, n in self.written.items()) or "nothing new"
        return (
            f"annotate: {self.images:,} images annotated ({tasks}) in {self.units_written} units "
            f"({self.units_done_before} already complete"
            f"{f', {self.images_earlier:,} images' if self.units_done_before else ''}); {skipped_text(self.skipped, self.skipped_earlier, 'units')}; "
            f"{wall_text(self.images, self.wall_s)}"
        )


def source(task: str, roles: Iterable[str]) -> str | None:
    """The model role whose output makes `task`'s maps, of the `roles` given: the one place that says normals come
    from the depth model unless a normals model is given; edges need no model."""
    if task == "edges":
        return None
    return "depth" if task == "normals" and "normals" not in roles else task


def model_roles(tasks: tuple[str, ...], job: Job) -> dict[str, str]:
    """The models the tasks need, role -> name."""
    names = {"depth": job.depth_model, "normals": job.normals_model, "segmentation": job.seg_model}
    given = [role for role, name in names.items() if name]
    roles = {role: names[role] for task in tasks if (role := source(task, given))}
    for role, name in roles.items():
        if not name:
            why = "normals without --normals-model come from depth" if role == "depth" and "depth" not in tasks else role
            flag = model_flag(role)
            raise AnnotateError(f"{flag} is needed ({why}): a local model folder or a hub id")
    return roles


def _settings(task: str, job: Job, models: dict[str, Model], legacy: bool = False) -> dict:
    """Everything besides the inputs that decides a task's outputs (`legacy`: with the models identified as versions
    before 2026-12-07 did)."""
    settings: dict = {"task": task, "max_size": job.max_size, "format": 1}
    identity = (lambda model: model.legacy_identity) if legacy else (lambda model: model.identity)
    if task == "edges":
        settings["canny"] = render.CANNY_THRESHOLDS
    elif source(task, models) != task:  # normals from depth
        settings.update(relief=render.RELIEF, depth=identity(models["depth"]))
    else:
        settings["model"] = identity(models[task])
    return settings


class UnitBatches(IterableDataset):
    """Batches of working-size images of the units to do, split over workers (one whole unit per worker)."""

    def __init__(self, works: list[Work], max_size: int, batch_size: int, processors: dict) -> None:
        self.works, self.max_size, self.batch_size, self.processors = works, max_size, batch_size, processors
        self.decode = DecodeOptions(draft=max_size or None)  # JPEG DCT scaling down to about the working size

    def __iter__(self):
        for index in worker_share(len(self.works)):
            work = self.works[index]
            roles = [role for role in self.processors if role in {source(task, self.processors) for task in work.tasks}]
            for rows, skips, last in read_batches(work.unit, self.decode, self.batch_size, self._prepare):
                yield self._batch(index, roles, rows, skips, last)

    def _prepare(self, picture: Picture) -> tuple[str, np.ndarray]:
        """The key and the working-size uint8 image (shrunk as it is decoded, so batches hold small arrays)."""
        return picture.key, render.to_uint8(render.fit(picture.pixels, self.max_size))

    def _batch(self, index: int, roles: list[str], rows: list, skips: list[Skip], last: bool) -> Batch:
        images = [rgb for _, rgb in rows]
        edges = [render.png(render.edges(rgb)) for rgb in images] if "edges" in self.works[index].tasks else []
        squares = [_square(rgb) for rgb in images] if roles else []  # for the models only: edges run on the image
        pixel_values = {role: preprocess(self.processors[role], squares) for role in roles} if rows else {}
        sizes = [rgb.shape[:2] for rgb in images]
        return Batch(index, [key for key, _ in rows], sizes, edges, pixel_values, skips, last)


def _square(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] squashed to [L, L, 3], L the longer side (see models.preprocess)."""
    side = max(rgb.shape[:2])
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    square = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False)
    return square[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def plan(
    job: Job, units: list[Unit], models: dict[str, Model], rank: int, world: int
) -> tuple[list[Work], int, int, int, Counter]:
    """This rank's units with the tasks they lack, how many (unit, task) outputs were complete already, how many
    units were complete in every task, and the images those units hold and left out (as their first task's report
    records them)."""
    settings = {task: [json.dumps(_settings(task, job, models, legacy), sort_keys=True, default=str)
                       for legacy in (False, True)] for task in job.tasks}
    works, done, complete, images_earlier, earlier = [], 0, 0, 0, Counter()
    for unit in units[rank::world]:
        lacking, inputs = {}, unit.inputs_digest()  # one stat per input
        for task in job.tasks:
            fingerprint, legacy = (hashlib.sha1(f"{text}\n{inputs}".encode()).hexdigest() for text in settings[task])
            if is_done(job.out / task, unit, fingerprint) or is_done(job.out / task, unit, legacy):
                done += 1
            else:
                lacking[task] = fingerprint
        if lacking:
            works.append(Work(unit, lacking))
        else:
            complete += 1
            images, skipped = recorded(shard_paths(job.out / job.tasks[0], unit.name)[1])
            images_earlier, earlier = images_earlier + images, earlier + skipped
    return works[: job.max_shards], done, complete, images_earlier, earlier


def _check(job: Job) -> None:
    try:  # the command line's rule, for a Job made in code
        names_of(TASKS, "task")(",".join(job.tasks))
    except argparse.ArgumentTypeError as error:
        raise AnnotateError(f"--tasks: {error}") from None
    if job.batch_size < 1 or job.workers < 0 or job.max_size < 0:
        raise AnnotateError("--batch-size must be at least 1, --workers and --max-size at least 0")
    output_folder(job.out, "--out", AnnotateError)


def _units(job: Job, prefix: str) -> list[Unit]:
    """The image and tar units of --images (videos are out of scope); --out inside the inputs is refused."""
    try:
        units, missing = find_units(job.images, job.images_per_shard, inputs_flag="--images")
    except TokenizeError as error:
        raise AnnotateError(str(error)) from None
    if missing:
        warn(f"{missing[0]}: named by --images, does not exist"
             + (f" ({len(missing) - 1} more such)" if len(missing) > 1 else ""), prefix)
    _check_out(job, units)
    videos = [u for u in units if u.kind == "videos"]
    if videos:
        warn(f"{sum(len(u.items) for u in videos)} video files left out (annotate takes images and tars)", prefix)
    units = [u for u in units if u.kind != "videos"]
    if not units:
        raise AnnotateError(f"{job.images[0]}: no images or tar shards to annotate")
    _check_keys(units)
    return units


def _check_out(job: Job, units: list[Unit]) -> None:
    """Refuse maps among the inputs: a rerun would annotate them and never find its units complete.

    A folder spec is checked by name, before a first run writes anything; for globs and brace patterns, which
    match the maps only once they exist, every folder holding a found input is checked against the map folders
    `<out>/<task>` (one resolve per folder). Inputs elsewhere under --out (`--images annot/images --out annot`)
    are no maps and are fine.
    """
    spec = spec_holding(job.out, job.images)
    if spec is not None:
        raise AnnotateError(f"{job.out}: --out is inside the input folder {spec}; a rerun would read its outputs as images")
    inside = folder_within(units, [job.out.resolve() / task for task in TASKS])
    if inside is not None:
        raise AnnotateError(f"{job.out}: --images found inputs among the maps of --out ({inside}): they would be "
                            "annotated as images; choose an --out outside the inputs")


class ListedKeys:
    """The map keys of every folder image of this run's listing, gathered at the first question only: a unit asks
    when its earlier report lists a map it no longer writes, whose image may have moved to another unit."""

    def __init__(self, units: list[Unit]) -> None:
        self.units, self.keys = units, None

    def __contains__(self, key: str) -> bool:
        if self.keys is None:
            self.keys = {key for unit in self.units for key in image_keys(unit)}
        return key in self.keys


def _check_keys(units: list[Unit]) -> None:
    """Refuse two folder images of different units with one key (two roots with the same relative paths, or
    `x.jpg` and `x.png` cut into two units): their maps are one file, the later overwriting the earlier. In one
    unit the second is a `duplicate_key` skip, as for tokenize."""
    if found := repeated_key(units):
        key, earlier, this = found
        raise AnnotateError(f"{earlier}: writes the same map <task>/{key}.png as {this}; annotate them "
                            "into different --out folders, or rename one")


def run(job: Job) -> Summary:
    """Annotate this rank's share; every option, input or model problem raises AnnotateError before any work."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        return _annotate(job)
    finally:  # TF32 for the models' matmuls on a GPU, not for what the calling process runs next
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _annotate(job: Job) -> Summary:
    """`run`'s work, with TF32 matmuls on a GPU."""
    rank, world, local_rank = ranks_from_env()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    _check(job)
    roles = model_roles(job.tasks, job)
    units = _units(job, prefix)
    device = pick_device(job.device, local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    models = {role: load(role, name, device) for role, name in roles.items()}
    works, done, complete, images_earlier, earlier = plan(job, units, models, rank, world)
    listed = ListedKeys(units)
    log(
        prefix,
        f"annotate: {len(units)} units in all, {len(units[rank::world])} for this rank; {done} task outputs already "
        f"complete; doing {len(works)} units now ({', '.join(t for t in job.tasks if any(t in w.tasks for w in works)) or '-'}) "
        f"on {device}, {job.workers} workers",
    )
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, usable_cores() - job.workers))  # leave the workers their cores
    summary = Summary(units_done_before=complete, images_earlier=images_earlier, skipped_earlier=earlier)
    processors = {role: m.processor for role, m in models.items()}
    dataset = UnitBatches(works, job.max_size, job.batch_size, processors)
    loader = DataLoader(dataset, batch_size=None, num_workers=job.workers, pin_memory=device.type == "cuda",
                        worker_init_fn=leave_stop_signals_to_main,
                        multiprocessing_context=decoding_start_method(job.workers))
    progress = Progress(len(works), prefix)
    outputs: dict[int, dict[str, UnitOutput]] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for batch in loader:
            work = works[batch.work]
            if batch.work not in outputs:
                outputs[batch.work] = {
                    task: UnitOutput(job.out / task, task, work.unit, fp, pool, listed) for task, fp in work.tasks.items()
                }
            _write(batch, outputs[batch.work], models)
            summary.images += len(batch.keys)
            for task in work.tasks:
                summary.written[task] += len(batch.keys)
            for skip in (s for s in batch.skips if s.reason not in MEMBERS_ONLY):  # no map lost: no skip
                for output in outputs[batch.work].values():
                    output.skip(skip)
                summary.skipped[skip.reason] += 1
                if sum(summary.skipped.values()) <= MAX_PRINTED_SKIPS:
                    log(prefix, f"skipped {skip.item}: {skip.reason}{' (' + skip.detail + ')' if skip.detail else ''}")
            if batch.last:
                for output in outputs.pop(batch.work).values():
                    output.commit()
                summary.units_written += 1
            progress.update(images=len(batch.keys), shards=int(batch.last))
    summary.wall_s = progress.elapsed()
    return summary


def _write(batch: Batch, outputs: dict[str, UnitOutput], models: dict[str, Model]) -> None:
    """Run the models the unit needs on the batch and queue every task's PNGs."""
    if not batch.keys:
        return
    predicted = {role: predict(models[role], values, batch.sizes) for role, values in batch.pixel_values.items()}
    for i, key in enumerate(batch.keys):
        for task, output in outputs.items():
            if task == "edges":
                data = batch.edges[i]
                output.add(key, lambda data=data: data)
                continue
            if task == "depth":
                array = (predicted["depth"][i] * 65535).round().to(torch.int32).cpu().numpy().astype(np.uint16)
                encode = partial(render.png, array)
            elif task == "normals":
                role = source(task, models)
                normals = predicted[role][i] if role == "normals" else render.normals_from_nearness(predicted[role][i])
                encode = partial(render.png, render.encode_normals(normals))
            else:
                labels = (predicted["segmentation"][i] % 256).to(torch.uint8).cpu().numpy()
                encode = partial(render.png, labels, labels=True)
            output.add(key, encode)
