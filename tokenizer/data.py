"""Training images for the VQGAN: a folder of image files or webdataset shards.

Batches are FloatTensor[B, 3, S, S] in [0, 1]; the LightningModule maps them to its
checkpoint's value range. The geometry is the tokenizer's own (its `resize`): `stretch` squeezes the
whole image to SxS, `center_crop` takes a random SxS window of the image with its shorter side at S
(the centre in validation); training also flips at random. Unreadable
images are skipped with a warning naming the file and never stop a run; the run's last line counts them.
"""

from __future__ import annotations

import functools
import glob
import io
import multiprocessing
import os
import random
import tarfile
from pathlib import Path
from typing import Callable, Literal, TypeVar

import torch
import webdataset as wds
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torchvision.transforms import v2

from common.errors import UserError, check_settings, lightning_worker_init, warn
from common.files import IMAGE_SUFFIXES, ShardPatternError, expand_shards, walk
from tokenizer.config import ResizeMode
from tokenizer.preprocess import UNREADABLE_IMAGE, cut_aspect, resize_square, to_rgb_float

RESUME_SEED_STRIDE = 1_000_003  # a resumed start's order seed is the run's + this x its step (a prime: no overlap with
# the seed + epoch that DistributedSampler draws each epoch from, for runs of fewer epochs than this)
T = TypeVar("T")
WDS_IMAGE_KEYS = ";".join(sorted(suffix[1:] for suffix in IMAGE_SUFFIXES))  # the tar members lvm.tokenize reads


def image_files(root: str | Path) -> list[Path]:
    """Image files under `root`, recursively, sorted, as every command lists a folder (`common.files.walk`: hidden
    files and folders, a `.thumbs/` or macOS's `._x.jpg`, are none; a folder that cannot be listed is an error)."""
    return _listing(root)[0]


def _listing(root: str | Path) -> tuple[list[Path], list[Path]]:
    """The image files (sorted) and the .tar shards under `root`, in one walk: a folder of a million images on a
    network filesystem takes minutes to list, on every rank."""
    errors: list[OSError] = []
    images, tars = [], []
    for path in map(Path, walk(str(root), errors)):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif path.suffix == ".tar":
            tars.append(path)
    if errors:
        raise UserError(errors[0].filename, f"cannot be listed ({errors[0].strerror.lower()})")
    return sorted(images), tars


def make_transform(size: int, train: bool, resize: ResizeMode = "stretch") -> Callable[[Image.Image], Tensor]:
    """Turned as EXIF says (`to_rgb_float`, as `lvm.tokenize` turns what it encodes), then the geometry `encode` gives
    images with the tokenizer's `resize` (`resize_square`), so that training shows the model what it will encode:
    a `stretch` tokenizer (the release's) squeezes every non-square image, and one trained on undistorted crops
    would meet that squeeze first in use. Training draws where a `center_crop` tokenizer's window falls (its
    shorter side at `size`; a banner first cut to a random `MAX_ASPECT`:1 part) and flips at random."""
    if train and resize == "center_crop":
        shorter_side = v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        geometry = v2.Compose([lambda x: shorter_side(cut_aspect(x, at_random=True)), v2.RandomCrop(size)])
    else:
        geometry = functools.partial(resize_square, size=size, mode=resize)
    flip = v2.RandomHorizontalFlip() if train else v2.Identity()
    return lambda image: flip(geometry(to_rgb_float(image))).clamp(0.0, 1.0)


class UnreadableCount:
    """How many unreadable images a run's loaders warned about, summed over their worker processes: an integer in
    shared memory, as each worker's own count would end with the worker. Its lock is made for spawned processes,
    which fork, forkserver and spawn workers can all share (one made in the default fork context cannot be sent
    to forkserver or spawn workers)."""

    def __init__(self) -> None:
        self._shared = multiprocessing.get_context("spawn").Value("q", 0)

    def add(self) -> None:
        with self._shared.get_lock():
            self._shared.value += 1

    @property
    def value(self) -> int:
        return self._shared.value


class ImageFolder(Dataset):
    """Every image file under a folder (`files`, when the caller listed them already); an unreadable file is warned
    about once (per DataLoader worker), counted in `unreadable`, and replaced by the next readable one, so batches
    keep their size."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Tensor], files: list[Path] | None = None,
                 unreadable: UnreadableCount | None = None) -> None:
        self.root, self.files = root, image_files(root) if files is None else files
        if not self.files:
            raise TrainingDataError(root, f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.transform = transform
        self.warned: set[Path] = set()  # an ImageNet-size folder with 0.1% bad files warned 1,300 times an epoch
        self.unreadable = unreadable or UnreadableCount()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            try:
                with Image.open(path) as image:
                    return self.transform(image)
            except UNREADABLE_IMAGE as err:
                if path not in self.warned:
                    self.warned.add(path)
                    self.unreadable.add()
                    warn(f"{path}: unreadable image skipped (told once; the next image takes its place): {err}")
        raise TrainingDataError(self.root, f"no readable image among its {len(self.files)} image files")


class TrainingDataError(UserError):
    """Training or validation images that cannot be read at all, named by the path or pattern given."""


class _BatchesOrError(DataLoader):
    """A DataLoader that raises when a whole pass gives no batch: shards whose image members are all unreadable
    (what failed downloads leave) or fewer images than a batch. Lightning would start one empty epoch after another,
    for ever, and a stop "after this optimizer step" would never come."""

    def __init__(self, source: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source = source

    def __iter__(self) -> "_CheckedPass":
        return _CheckedPass(super().__iter__(), self)


class _CheckedPass:
    """One pass of `_BatchesOrError`: torch's iterator (its other attributes are read through), counting batches."""

    def __init__(self, inner, loader: _BatchesOrError) -> None:
        self.inner, self.loader, self.batches = inner, loader, 0

    def __iter__(self) -> "_CheckedPass":
        return self

    def __next__(self):
        try:
            batch = next(self.inner)
        except StopIteration:
            if not self.batches:
                raise TrainingDataError(
                    self.loader.source, f"a pass gave no batch of {self.loader.batch_size}: no readable image in its "
                    "shards, or fewer images than a batch (the log names the skipped ones)") from None
            raise
        self.batches += 1
        return batch

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def webdataset_images(
    urls: str | list[str], transform: Callable[[Image.Image], Tensor], train: bool, seed: int = 0,
    unreadable: UnreadableCount | None = None,
) -> IterableDataset:
    """Images from webdataset shards: a list of local shards (checked to hold images: shards that give no image
    would leave training waiting on an empty stream, with no step ever run) or a remote URL pattern.
    Bad samples are warned about, counted in `unreadable` and skipped. For training, each rank's and worker's shards
    in an order drawn from `seed` and the pass (webdataset's `detshuffle`), then samples mixed in a buffer of 1000
    drawn from `seed`: left to webdataset, every pass and every start took the same shard order and the buffer was
    seeded by the clock."""
    if isinstance(urls, list):
        _check_holds_images(urls[0])
    skip = functools.partial(_skip_with_warning, unreadable=unreadable or UnreadableCount())
    dataset = wds.WebDataset(
        urls,
        shardshuffle=100 if train else False,
        detshuffle=True,
        seed=seed,
        nodesplitter=wds.split_by_node,
        handler=skip,
        empty_check=False,
    )
    if train:
        dataset = dataset.shuffle(1000, rng=random.Random(seed))
    return dataset.map(functools.partial(_decode_sample, transform=transform), handler=skip)


def _skip_with_warning(error: Exception, unreadable: UnreadableCount) -> bool:
    """webdataset's handler for a bad sample or shard: log it, count it and go on. Its own `warn_and_continue`
    sleeps half a second per bad sample and names only a BytesIO object."""
    warn(f"{error} (skipped)")
    unreadable.add()
    return True


def _decode_sample(sample: dict, transform: Callable[[Image.Image], Tensor]) -> Tensor:
    """A sample's first image member opened as the file itself would be, so that `transform` converts it as it
    converts a folder's images: webdataset's "pil" decoder converts to RGB first, which drops alpha instead of
    compositing over white and clips 16-bit images to 8 bits. Errors name the shard and member."""
    where = f"{sample.get('__url__')}: {sample.get('__key__')}"
    name = next((key for key in WDS_IMAGE_KEYS.split(";") if key in sample), None)
    if name is None:
        raise ValueError(f"{where}: no image member")
    try:
        with Image.open(io.BytesIO(sample[name])) as image:
            return transform(image)
    except UNREADABLE_IMAGE as err:
        raise ValueError(f"{where}.{name}: unreadable image ({err})") from None


def _check_holds_images(shard: str) -> None:
    """A shard that is no tar or holds no image member (token or sentence shards given by mistake) is refused:
    a stream whose every sample fails would leave training waiting with no step ever run."""
    suffixes = tuple(f".{key}" for key in WDS_IMAGE_KEYS.split(";"))
    try:
        with tarfile.open(shard) as tar:
            if not any(member.name.lower().endswith(suffixes) for member in tar):
                raise TrainingDataError(shard, f"holds no image member ({', '.join(suffixes)}): token or sentence shards?")
    except (tarfile.TarError, OSError) as err:
        raise TrainingDataError(shard, f"not a readable tar shard ({type(err).__name__})") from None


def _check_source(source: str) -> None:
    """A local source that names nothing, said here, when the config is built: on 8 devices Lightning would first
    start 8 processes and build the model in each, then report it 8 times."""
    if any(marker in source for marker in ("://", "pipe:")) or Path(source).is_dir():
        return  # remote, or a folder (of images or of tars: read when the loader is made)
    if not glob.has_magic(source) and "{" not in source and not Path(source).exists():
        raise TrainingDataError(source, "no such file or directory")
    expand_shards(source)  # a glob or brace pattern naming no shard: one line naming it


def _local_inputs(source: str) -> tuple[Literal["images", "shards"], list]:
    """A folder with image files is read as images (their paths); anything else names shards as every command does
    (`expand_shards`: a folder of tars, a glob, a brace pattern)."""
    folder = Path(source).is_dir()
    images, tars = _listing(source) if folder else ([], [])
    if images:
        if tars:  # read as images only, the shards would be left out without a word
            raise TrainingDataError(source, f"holds both image files and {len(tars)} .tar shards; name one kind "
                                            f"(a glob such as {Path(source) / '*.tar'}, or a folder of images)")
        return "images", images
    try:
        return "shards", expand_shards(source)
    except ShardPatternError:
        if not folder:
            raise  # names the pattern, or the shard of a brace pattern that does not exist
        raise TrainingDataError(source, f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) and no .tar shards") from None


class ImageDataModule(LightningDataModule):
    """`train`/`val`: a folder of images, local webdataset shards named as every command names them (a folder
    of tars, a glob, a brace pattern), or a remote webdataset URL pattern."""

    def __init__(
        self,
        train: str,
        val: str | None = None,
        image_size: int = 256,
        batch_size: int = 16,
        num_workers: int = 4,
        resize: ResizeMode = "stretch",
    ) -> None:
        super().__init__()
        check_settings("data", (("image_size", image_size, image_size >= 1, "must be >= 1"),
                                ("resize", resize, resize in ("stretch", "center_crop"), "must be stretch or center_crop"),
                                ("batch_size", batch_size, batch_size >= 1, "must be >= 1"),
                                ("num_workers", num_workers, num_workers >= 0, "must be >= 0")), TrainingDataError)
        for source in (train, val):
            if source is not None:
                _check_source(source)
        self.train, self.val = train, val
        self.image_size, self.batch_size, self.num_workers, self.resize = image_size, batch_size, num_workers, resize
        self.unreadable = UnreadableCount()  # training's and validation's, for the run's last line

    def setup(self, stage: str) -> None:
        """A count of this rank's own: ranks forked from the process that built this module (`ddp_fork`, Lightning's
        choice in a notebook) would share its counter, and the sum over ranks would count each image once per rank."""
        self.unreadable = UnreadableCount()

    def _dataset(self, source: str, train: bool) -> Dataset | IterableDataset:
        """A remote webdataset URL, or a local source as `_local_inputs` lists it."""
        transform = make_transform(self.image_size, train, self.resize)
        if any(marker in source for marker in ("://", "pipe:")):
            return webdataset_images(source, transform, train, self._order_seed(), self.unreadable)
        kind, paths = self._listed_by_first_rank(functools.partial(_local_inputs, source))
        if kind == "images":
            return ImageFolder(source, transform, paths, self.unreadable)
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(paths) < world:  # the devices without one stopped saying their shards held no readable image
            raise TrainingDataError(source, f"{len(paths)} shard{'s' * (len(paths) != 1)} for {world} devices: each "
                                            f"device reads whole shards; give at least {world}, or a folder of images")
        return webdataset_images(paths, transform, train, self._order_seed(), self.unreadable)

    def _listed_by_first_rank(self, listing: Callable[[], T]) -> T:
        """`listing()` on the first rank, its result (or its error) sent to the others: every rank must split the same
        list (a folder still being filled, by img2dataset say, would give each rank its own, and ranks whose
        samplers differ in length wait for each other at the epoch's end forever), and a network filesystem is then
        listed once, not once per rank."""
        if self.trainer is None or self.trainer.world_size == 1:
            return listing()
        outcome: tuple[T | None, UserError | None] = (None, None)
        failure: Exception | None = None
        if self.trainer.global_rank == 0:
            try:
                outcome = (listing(), None)
            except Exception as err:  # raised on every rank, not on the first alone while the others wait for it
                failure = err
                outcome = (None, err if isinstance(err, UserError) else UserError(f"the first rank failed to list it: "
                                                                                   f"{type(err).__name__}: {err}"))
        result, error = self.trainer.strategy.broadcast(outcome, src=0)
        if failure is not None:
            raise failure  # the first rank's own error, with its traceback where it is a bug
        if error is not None:
            raise error
        return result

    def _order_seed(self) -> int:
        """The seed of the training order of this start: the run's (`seed_everything`, which Lightning passes on as
        PL_GLOBAL_SEED) from step 0, another for each step a run resumes at. Lightning restarts the data of an
        interrupted epoch from its beginning; drawn again from the run's seed, every resume replayed the run's first
        batches and never reached the rest of the data."""
        start = self.trainer.global_step if self.trainer is not None else 0
        return (int(os.environ.get("PL_GLOBAL_SEED", 0)) + RESUME_SEED_STRIDE * start) % 2**63

    def _sampler(self, dataset: Dataset) -> DistributedSampler | None:
        """A folder's training order for a resumed or multi-device run (`_order_seed`; Lightning calls `set_epoch`);
        None for a fresh single-device run, which keeps the DataLoader's own shuffle (what made the demo's
        tokenizer, which its recorded figures come from)."""
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if world == 1 and (self.trainer is None or self.trainer.global_step == 0):
            return None
        return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self._order_seed())

    def _loader(self, source: str, train: bool) -> DataLoader:
        dataset = self._dataset(source, train)
        is_map = isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset)
        if train and is_map and len(dataset) < self.batch_size:  # Lightning would train 0 steps and exit 0
            raise TrainingDataError(source, f"{len(dataset)} images, fewer than data.batch_size {self.batch_size} "
                                            "(training drops the last, partial batch)")
        sampler = self._sampler(dataset) if train and is_map else None
        return _BatchesOrError(
            source,
            dataset,
            batch_size=self.batch_size,
            shuffle=train and is_map and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=functools.partial(lightning_worker_init, rank=self.trainer.global_rank if self.trainer else 0),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val, train=False) if self.val else []
