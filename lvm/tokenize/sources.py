"""Enumerate the inputs of `--shards` into a deterministic list of output units.

A unit is the work behind exactly one output shard. The mapping input -> unit -> output name
depends only on the input file names, never on timing or worker counts, so that ranks split
the list without talking to each other and a rerun recognises the shards it already wrote:

- each input tar is one unit, named by its path relative to its root (`laion/00012.tar` ->
  `00012.tar`);
- the images under a root are sorted by relative path and cut into units of
  `images_per_shard`, named `<root>-img-000000`, `<root>-img-000001`, ...;
- the videos under a root likewise, `videos_per_shard` at a time: `<root>-vid-000000`, ...

With `frame_folders`, every folder of images is a sequence of frames: each image gets its index in the
natural order of its folder's file names (`f2.png` before `f10.png`), numbered here because a folder's
frames may fall into several units.

The root of a spec is the folder it names, or the folder before its first wildcard or brace.

A subfolder that cannot be listed (permissions) becomes an item of its root's images with the error, which
the readers turn into an `unreadable_folder` skip: counted and reported like any unreadable file, rather than
dropped silently as `os.walk` would.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from common.files import IMAGE_SUFFIXES, expand_pattern, natural_key
from lvm.tokenize import TokenizeError

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv"})  # what FFmpeg (PyAV) reads
TAR_SUFFIX = ".tar"
Kind = Literal["tar", "images", "videos"]
_MAGIC = re.compile(r"[{*?\[]")


@dataclass(frozen=True)
class Item:
    """One input file: where it is, and its path relative to its root (keys come from it)."""

    path: str
    rel: str
    frame: int | None = None  # position in its folder's natural file-name order, with frame_folders
    error: str = ""  # a folder that could not be listed: why (read as an unreadable_folder skip)


@dataclass(frozen=True)
class Unit:
    """The inputs of one output shard."""

    name: str  # output shard path relative to --out, without ".tar"
    kind: Kind
    items: tuple[Item, ...]
    dataset: str = ""  # images and videos: the name of their root, which heads their `video` ids (decode.py)

    def inputs_digest(self) -> str:
        """A digest of the unit's inputs as they are now: relative paths (so a rerun from another working
        folder or mount point still recognises its shards) with each file's size and mtime, so that a rerun
        redoes a shard whose inputs changed, a file replaced under its name included (a re-downloaded image)."""
        text = "\n".join([self.kind, *map(_digest_line, self.items)])
        return hashlib.sha1(text.encode()).hexdigest()


def _digest_line(item: Item) -> str:
    """`<rel>[#frame | / for an unlisted folder] <size>:<mtime>`; `-` for a file gone (read as unreadable). The
    modification time in whole seconds: copies by tar or zip keep no finer ones, and should not redo a whole job."""
    rel = item.rel + (f"#{item.frame}" if item.frame is not None else "/" if item.error else "")
    try:
        stat = os.stat(item.path)
    except OSError:
        return f"{rel} -"
    return f"{rel} {stat.st_size}:{int(stat.st_mtime)}"


def _kind_of(path: str) -> str | None:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == TAR_SUFFIX:
        return "tar"
    if suffix in IMAGE_SUFFIXES:
        return "images"
    if suffix in VIDEO_SUFFIXES:
        return "videos"
    return None


def _root_of(spec: str) -> str:
    """The folder part of a spec before its first wildcard or brace (the spec itself for a folder)."""
    magic = _MAGIC.search(spec)
    if magic is None:
        return spec if os.path.isdir(spec) else (os.path.dirname(spec) or ".")
    return os.path.dirname(spec[: magic.start()]) or "."


def default_out(specs: list[str]) -> Path:
    """`tokens/<name of the first source>`: the name of its folder (`laion/` and `laion/{00000..00099}.tar`
    give `tokens/laion`), or the stem of a single file (`clip.mp4` gives `tokens/clip`)."""
    spec = specs[0]
    single_file = _MAGIC.search(spec) is None and not os.path.isdir(spec)
    name = Path(spec).stem if single_file else Path(_root_of(spec)).resolve().name
    return Path("tokens") / (name or "tokens")


def walk(folder: str) -> tuple[list[str], list[OSError]]:
    """Every non-hidden file under a folder, recursively, in sorted order, and the errors of the folders that
    could not be listed (which `os.walk` would leave out silently).

    Links to folders are followed, but each real folder is entered once: `os.walk` keeps no record of visited
    folders, so a link back to an ancestor (`up -> ..`) would list every image again under ever longer keys,
    and two such links would double the listing at every level, never finishing.
    """
    found: list[str] = []
    errors: list[OSError] = []
    entered = {_folder_id(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, onerror=errors.append, followlinks=True):
        dirnames[:] = _unentered(dirpath, sorted(d for d in dirnames if not d.startswith(".")), entered)
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return found, errors


def _folder_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the folder a path names, links followed; None when it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _unentered(dirpath: str, names: list[str], entered: set[tuple[int, int]]) -> list[str]:
    """The subfolders of `dirpath` (sorted names) whose real folder is not yet in `entered`, now added to it.

    A folder that cannot be stat'ed is kept, so that `os.walk` reports it through its error handler.
    """
    kept = []
    for name in names:
        ident = _folder_id(os.path.join(dirpath, name))
        if ident is None or ident not in entered:
            kept.append(name)
            if ident is not None:
                entered.add(ident)
    return kept


def _listing(paths: list[str], root: str) -> tuple[list[str], list[Item]]:
    """The files of a spec's paths (folders walked), and an item for each subfolder that could not be listed;
    a root that cannot be listed is an error."""
    files, unlisted = [], []
    for path in paths:
        walked, errors = walk(path) if os.path.isdir(path) else ([path], [])
        files += walked
        for error in errors:
            rel = Path(os.path.relpath(error.filename, root)).as_posix()
            if rel == ".":
                raise TokenizeError(error.filename, f"cannot list the folder ({error.strerror.lower()})")
            unlisted.append(Item(error.filename, rel, error=f"{type(error).__name__}: {error.strerror}"))
    return files, unlisted


def _expand(spec: str) -> tuple[list[str], list[str]]:
    """All existing paths a spec names (brace pattern, then glob), and the brace-named paths that are missing."""
    paths, missing = [], []
    for name, found in expand_pattern(spec):
        paths.extend(found)
        if found or glob.has_magic(name):
            continue
        if name == spec:
            raise TokenizeError(spec, "no such file or directory")
        missing.append(name)
    return paths, missing


def _group(root: str, items: list[Item], kind: str, per_shard: int) -> list[Unit]:
    label = "img" if kind == "images" else "vid"
    base = Path(root).resolve().name or "root"
    items = sorted(set(items), key=lambda i: i.rel)
    return [
        Unit(f"{base}-{label}-{n:06d}", kind, tuple(items[start : start + per_shard]), base)
        for n, start in enumerate(range(0, len(items), per_shard))
    ]


_NUMBERED = re.compile(r"(.+-(?:img|vid))-\d{6}")


def leftover_shards(out: Path, units: list[Unit]) -> list[Path]:
    """Shards in `out` numbered like this run's image and video units but not among them.

    An earlier run that cut the same root into more units (a smaller `--images-per-shard`, or files since
    removed) leaves them behind; the sentence builder reads every `.tar` of a folder, so their images
    would be read twice.
    """
    names = {u.name for u in units}
    families = {m.group(1) for name in names if (m := _NUMBERED.fullmatch(name))}
    return sorted(
        tar
        for family in families
        for tar in out.glob(f"{glob.escape(family)}-{'[0-9]' * 6}{TAR_SUFFIX}")
        if tar.name[: -len(TAR_SUFFIX)] not in names
    )


def within(path: str, folder: Path) -> bool:
    """Whether `path`, links resolved, is the resolved `folder` or lies below it."""
    resolved = Path(path).resolve()
    return resolved == folder or folder in resolved.parents


def spec_holding(out: Path, specs: list[str]) -> str | None:
    """The folder spec that `out` lies in, if any: checked by name, so before a first run has written anything,
    since a rerun would read the outputs as inputs."""
    resolved = out.resolve()
    return next((spec for spec in specs if os.path.isdir(spec) and within(str(resolved), Path(spec).resolve())), None)


def folder_within(units: list[Unit], folders: list[Path]) -> str | None:
    """The first folder holding a found input that lies in one of `folders` (resolved), if any: for globs and
    brace patterns, which match outputs only once they exist. One resolve per folder, not per file."""
    holding = sorted({os.path.dirname(item.path) for unit in units for item in unit.items})
    return next((h for h in holding if any(within(h, folder) for folder in folders)), None)


def number_frames(items: list[Item]) -> list[Item]:
    """The images with their frame index: their position among their folder's images in natural name order."""
    folders: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        if not item.error:
            folders[str(PurePosixPath(item.rel).parent)].append(item)
    numbered = [item for item in items if item.error]  # unlisted folders: no frames
    for members in folders.values():
        ordered = sorted(members, key=lambda i: (natural_key(PurePosixPath(i.rel).name), i.rel))
        numbered += [Item(item.path, item.rel, frame) for frame, item in enumerate(ordered)]
    return numbered


def find_units(
    specs: list[str],
    images_per_shard: int = 1000,
    videos_per_shard: int = 8,
    frame_folders: bool = False,
    inputs_flag: str | None = "--shards",
) -> tuple[list[Unit], list[str]]:
    """Units for all specs, sorted by name, and the brace-named paths that do not exist.

    With `frame_folders`, images carry their frame index in their folder (`number_frames`).
    Raises TokenizeError when a spec names no input at all or two inputs would write the same
    output shard; the message's advice names `inputs_flag`, the caller's flag for the specs (None:
    a caller that writes no shard per unit, where equal names do no harm).
    """
    if images_per_shard < 1 or videos_per_shard < 1:
        raise TokenizeError("--images-per-shard and --videos-per-shard must be at least 1")
    units: list[Unit] = []
    grouped: dict[tuple[str, str], list[Item]] = defaultdict(list)
    all_missing: list[str] = []
    for spec in specs:
        root = _root_of(spec)
        paths, missing = _expand(spec)
        all_missing.extend(missing)
        files, unlisted = _listing(paths, root)
        if unlisted:
            grouped[(os.path.realpath(root), "images")] += unlisted
        found = len(unlisted)
        for path in files:
            kind = _kind_of(path)
            if kind is None:
                continue
            found += 1
            item = Item(path, Path(os.path.relpath(path, root)).as_posix())
            if kind == "tar":
                units.append(Unit(item.rel[: -len(TAR_SUFFIX)], "tar", (item,)))
            else:
                grouped[(os.path.realpath(root), kind)].append(item)
        if not found:
            raise TokenizeError(f"{spec}: matches no tar shard, image or video file")
    for (root, kind), items in sorted(grouped.items()):
        if frame_folders and kind == "images":
            items = number_frames(sorted(set(items), key=lambda i: i.rel))
        units.extend(_group(root, items, kind, images_per_shard if kind == "images" else videos_per_shard))
    units = sorted(set(units), key=lambda u: (u.name, u.items[0].path))
    for a, b in zip(units, units[1:]):
        if inputs_flag and a.name == b.name:
            raise TokenizeError(
                f"{a.items[0].path}: writes the same output shard {a.name}.tar as {b.items[0].path}; "
                f"give their common parent folder as {inputs_flag}, or write them into different --out folders"
            )
    return units, all_missing
