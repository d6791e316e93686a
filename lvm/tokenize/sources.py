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
from array import array
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from common.files import IMAGE_SUFFIXES, expand_pattern, natural_key, walk, within
from lvm.tokenize import TokenizeError

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv", ".ts", ".m2ts",
                            ".mts", ".3gp", ".3g2", ".flv", ".wmv", ".asf", ".vob", ".mxf"})  # what FFmpeg (PyAV) reads
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
    """The inputs of one output shard.

    Every rank plans every unit (it takes its share afterwards), so a folder of ten million images is held by each
    rank: a file is kept as its relative path alone, a string shared with the sorted listing, and becomes an `Item`
    only when asked (`items`). Items are kept for tars and folders that could not be listed, which are few.
    """

    name: str  # output shard path relative to --out, without ".tar"
    kind: Kind
    entries: tuple[str | Item, ...]  # relative paths under `root`, in order, or whole Items
    dataset: str = ""  # images and videos: the name of their root, which heads their `video` ids (decode.py)
    root: str = ""  # the folder the relative paths of `entries` start from
    frames: tuple[int | None, ...] = ()  # with frame_folders: each entry's frame index (None: an unlisted folder)

    @property
    def items(self) -> tuple[Item, ...]:
        return tuple(self._item(n) for n in range(len(self.entries)))

    @property
    def first_path(self) -> str:
        return self._item(0).path

    def _item(self, n: int) -> Item:
        entry = self.entries[n]
        if isinstance(entry, Item):
            return entry
        return Item(_joined(self.root, entry), entry, self.frames[n] if self.frames else None)

    def inputs_digest(self) -> str:
        """A digest of the unit's inputs as they are now: relative paths (so a rerun from another working
        folder or mount point still recognises its shards) with each file's size and mtime, so that a rerun
        redoes a shard whose inputs changed, a file replaced under its name included (a re-downloaded image)."""
        text = "\n".join([self.kind, *map(_digest_line, self.items)])
        return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()  # a name's bytes, UTF-8 or not


def safe_key(rel: str) -> str:
    """A relative path without suffix whose file-name part has no dots (webdataset splits keys at the first dot)."""
    path = PurePosixPath(rel)
    return str(path.with_name(path.stem.replace(".", "_")))


def image_keys(unit: Unit) -> Iterator[str]:
    """The keys of a folder unit's images (none for a tar unit: its keys are its members')."""
    for entry in unit.entries if unit.kind == "images" else ():
        if not (isinstance(entry, Item) and entry.error):  # an unreadable folder, no image
            yield safe_key(entry.rel if isinstance(entry, Item) else entry)


def repeated_key(units: Sequence[Unit]) -> tuple[str, str, str] | None:
    """(key, earlier path, later path) of two folder images of different units with one key (`x.jpg` and `x.png`
    cut apart, `x.y.png` and `x_y.png`), or None. In one unit the second is a `duplicate_key` skip.

    Keys are compared by their 64-bit hash first, 12 bytes a file: every rank checks, and a folder may hold ten
    million images."""
    hashes, owners = array("q"), array("i")
    for index, unit in enumerate(units):
        for key in image_keys(unit):
            hashes.append(hash(key))
            owners.append(index)
    order = np.argsort(np.frombuffer(hashes, np.int64), kind="stable")
    hashed, owner = np.frombuffer(hashes, np.int64)[order], np.frombuffer(owners, np.int32)[order]
    for at in np.flatnonzero((hashed[1:] == hashed[:-1]) & (owner[1:] != owner[:-1])):  # then compared as text
        a, b = int(owner[at]), int(owner[at + 1])
        for key in (key for key in image_keys(units[a]) if hash(key) == hashed[at]):
            if key in set(image_keys(units[b])):
                return key, *(next(item.path for item in units[i].items if not item.error and safe_key(item.rel) == key)
                              for i in (a, b))
    return None


def _joined(root: str, rel: str) -> str:
    """The path of `rel` under `root` as the listing spelt it (`x.jpg`, not `./x.jpg`, for the working folder)."""
    return rel if root in (".", "") else os.path.join(root, rel)


def _relative(path: str, root: str) -> str:
    """`path` relative to `root`, by cutting the prefix that listing under `root` gave it (`os.path.relpath` costs
    ~20 us a file: minutes for ten million), or by `relpath` where the rest is not a plain relative path."""
    if root in (".", "./"):
        rel: str | None = path[2:] if path.startswith("./") else path
    else:
        prefix = root if root.endswith("/") else root + "/"
        rel = path[len(prefix):] if path.startswith(prefix) else None
    if rel is None or rel.startswith("/") or {"", ".", ".."} & set(rel.split("/")):
        rel = Path(os.path.relpath(path, root)).as_posix()
        if rel == ".." or rel.startswith("../"):  # a pattern that climbs out of its root (`a/{.,../b}/*.png`)
            raise TokenizeError(path, f"lies outside {root}, where its pattern starts: its output would be written "
                                      "outside --out (over the inputs, with --out .); give its folder as a path of its own")
    return rel


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


def _listing(paths: list[str], root: str, unlisted: list[Item]) -> Iterator[str]:
    """The files of a spec's paths (folders walked), yielded as found, and an item appended to `unlisted` for each
    subfolder that could not be listed; a root that cannot be listed is an error."""
    for path in paths:
        if not os.path.isdir(path):
            yield path
            continue
        errors: list[OSError] = []
        yield from walk(path, errors)
        for error in errors:
            rel = Path(os.path.relpath(error.filename, root)).as_posix()
            if rel == ".":
                raise TokenizeError(error.filename, f"cannot list the folder ({error.strerror.lower()})")
            unlisted.append(Item(error.filename, rel, error=f"{type(error).__name__}: {error.strerror}"))


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


def _group(root: str, real_root: str, entries: list[str | Item], frames: list[int | None], kind: str, per_shard: int) -> list[Unit]:
    label = "img" if kind == "images" else "vid"
    base = Path(real_root).name or "root"
    return [
        Unit(f"{base}-{label}-{n:06d}", kind, tuple(entries[start : start + per_shard]), base, root,
             tuple(frames[start : start + per_shard]))
        for n, start in enumerate(range(0, len(entries), per_shard))
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


def folder_within(units: list[Unit], folders: list[Path]) -> str | None:
    """The first folder holding a found input that lies in one of `folders` (resolved), if any: for globs and
    brace patterns, which match outputs only once they exist. One resolve per folder, not per file."""
    parents = {(u.root, e.rpartition("/")[0]) if isinstance(e, str) else ("", os.path.dirname(e.path)) for u in units for e in u.entries}
    holding = sorted({_joined(root, parent) if root else parent for root, parent in parents})
    return next((h for h in holding if any(within(h, folder) for folder in folders)), None)


def number_frames(entries: list[str | Item]) -> list[int | None]:
    """Each entry's frame index: its position among its folder's images in natural name order (None for an
    unlisted folder, which holds no frame)."""
    folders: dict[str, list[int]] = defaultdict(list)
    for n, entry in enumerate(entries):
        if isinstance(entry, str):
            folders[entry.rpartition("/")[0]].append(n)
    frames: list[int | None] = [None] * len(entries)
    for members in folders.values():
        members.sort(key=lambda n: (natural_key(entries[n].rpartition("/")[2]), entries[n]))
        for frame, n in enumerate(members):
            frames[n] = frame
    return frames


def _check_overlaps(grouped: dict[tuple[str, str], tuple[str, set[str], dict]]) -> None:
    """Refuse a folder named beside a folder inside it (`photos/ photos/a/`) when both list a file: its images would
    be tokenized twice, under two keys."""
    for (outer, kind), (outer_spelt, outer_rels, _) in grouped.items():
        for (inner, inner_kind), (inner_spelt, inner_rels, _) in grouped.items():
            if inner_kind == kind and inner.startswith(outer.rstrip(os.sep) + os.sep):
                prefix = os.path.relpath(inner, outer) + "/"
                twice = next((rel for rel in sorted(inner_rels) if prefix + rel in outer_rels), None)
                if twice is not None:
                    raise TokenizeError(f"{_joined(inner_spelt, twice)}: listed twice, under {outer_spelt} and under "
                                        f"{inner_spelt}, which lies inside it; give only {outer_spelt}")


def _check_video_keys(root: str, rels: set[str]) -> None:
    """Refuse two videos of one key (`clip.mp4` and `clip.mkv`): their frames would be one video to the sentence
    builders, each frame number twice."""
    first: dict[str, str] = {}
    for rel in sorted(rels):
        other = first.setdefault(safe_key(rel), rel)
        if other != rel:
            raise TokenizeError(f"{_joined(root, rel)}: has the key {safe_key(rel)} of {_joined(root, other)} (keys drop "
                                "the suffix), so their frames would be one video; rename one")


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
    # (real root, kind) -> (the root as first spelt, relative paths, unlisted folders by relative path): a file
    # named by two specs (`d` and `./d`) is one input
    grouped: dict[tuple[str, str], tuple[str, set[str], dict[str, Item]]] = {}
    all_missing: list[str] = []
    for spec in specs:
        root = _root_of(spec)
        real_root = os.path.realpath(root)
        paths, missing = _expand(spec)
        all_missing.extend(missing)
        unlisted: list[Item] = []
        found = 0
        for path in _listing(paths, root, unlisted):
            kind = _kind_of(path)
            if kind is None:
                continue
            found += 1
            rel = _relative(path, root)
            if kind == "tar":
                units.append(Unit(rel[: -len(TAR_SUFFIX)], "tar", (Item(path, rel),)))
            else:
                grouped.setdefault((real_root, kind), (root, set(), {}))[1].add(rel)
        if unlisted:
            grouped.setdefault((real_root, "images"), (root, set(), {}))[2].update((item.rel, item) for item in unlisted)
        if not found + len(unlisted):
            raise TokenizeError(f"{spec}: matches no tar shard, image or video file")
    _check_overlaps(grouped)
    for (real_root, kind), (root, rels, unlisted_items) in sorted(grouped.items(), key=lambda group: group[0]):
        if kind == "videos":
            _check_video_keys(root, rels)
        entries = sorted([*rels, *unlisted_items.values()], key=lambda e: e if isinstance(e, str) else e.rel)
        frames = number_frames(entries) if frame_folders and kind == "images" else []
        units.extend(_group(root, real_root, entries, frames, kind, images_per_shard if kind == "images" else videos_per_shard))
    units = sorted(set(units), key=lambda u: (u.name, u.first_path))
    units = [u for n, u in enumerate(units) if not (n and u.name == units[n - 1].name and  # a tar named twice (d ./d)
                                                    os.path.realpath(u.first_path) == os.path.realpath(units[n - 1].first_path))]
    for a, b in zip(units, units[1:]):
        if inputs_flag and a.name == b.name:
            raise TokenizeError(
                f"{a.first_path}: writes the same output shard {a.name}.tar as {b.first_path}; "
                f"give their common parent folder as {inputs_flag}, or write them into different --out folders"
            )
    return units, all_missing
