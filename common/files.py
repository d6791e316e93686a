"""File conventions shared by every stage: the one atomic write, which files are images, when a tar is whole.

Every output a later run or another stage reads (token and sentence shards, their reports and
indexes, checkpoints) is written with `atomic_write`, so a killed job leaves either the complete
file or a `<name>.tmp` that the next run removes or overwrites, never a truncated file under the
final name.
"""

from __future__ import annotations

import bz2
import fnmatch
import glob
import gzip
import json
import lzma
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from braceexpand import braceexpand

from common.errors import UserError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm", ".pbm", ".pnm"}
)
"""Image files every command reads from folders: the formats Pillow decodes that vision datasets use
(camera frames often come as PGM/PPM, microscopy and remote sensing as TIFF)."""


def natural_key(name: str | Path) -> tuple[list, str]:
    """Sort key of a file name that orders its digit runs as numbers (frame2 before frame10), case-blind;
    a path sorts by its name. Tuples keep digit and text runs comparable with each other; the name itself
    breaks ties (f1 / f01, A / a), so the order never depends on the order files were listed in."""
    name = name.name if isinstance(name, Path) else name
    runs = [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name) if part]
    return runs, name


def walk(folder: str, errors: list[OSError]) -> Iterator[str]:
    """Every non-hidden file under a folder, recursively, in sorted order, yielded as found (a list of ten million
    paths would cost every rank a gigabyte), with the errors of the folders that could not be listed appended to
    `errors` (`os.walk` would leave them out silently).

    Links to folders are followed, but each real folder is entered once: `os.walk` keeps no record of visited
    folders, so a link back to an ancestor (`up -> ..`) would list every image again under ever longer keys,
    and two such links would double the listing at every level, never finishing.
    """
    entered = {_folder_id(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, onerror=errors.append, followlinks=True):
        dirnames[:] = _unentered(dirpath, sorted(d for d in dirnames if not d.startswith(".")), entered)
        yield from (os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))


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


def tmp_path(path: str | Path) -> Path:
    """Where `atomic_write` stages `path`: `<path>.tmp` beside it (the same filesystem, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """A file opened on `<path>.tmp` that becomes `path` only when the block completes.

    On completion the data is flushed and fsynced, the file renamed over `path`, and the directory
    fsynced, so the rename itself survives a power cut. If the block raises, `path` is untouched and the
    `.tmp` file stays for the next run to overwrite. `durable=False` only renames: for one of many files
    that a later completion marker covers, made durable together by `sync_files` before the marker is
    written (1.7-9x faster than two fsyncs per file on this project's machines: BENCHMARKS.md).
    """
    path = Path(path)
    with open(tmp_path(path), mode) as file:
        yield file
    if durable:
        commit_file(path)
    else:
        os.replace(tmp_path(path), path)


def write_atomic(path: str | Path, text: str) -> None:
    """`path` holds `text`, written with `atomic_write`: a report another run or stage reads is whole or absent."""
    with atomic_write(path, "w") as file:
        file.write(text)


def json_text(data: object) -> str:
    """A report as strict JSON: a non-finite float (a perplexity past exp(709), the PSNR of an exact copy)
    becomes null, because JSON has no Infinity or NaN and strict readers (jq 1.6, browsers, most languages)
    refuse the `Infinity` Python writes. `json_number` reads such a field back."""
    return json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def json_number(value: float | None) -> float:
    """A number of a `json_text` report: null (not finite) reads as +inf, the only non-finite value a
    perplexity or PSNR takes."""
    return math.inf if value is None else value


def _fsync(path: str | Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def commit_file(path: str | Path) -> None:
    """Make `<path>.tmp`, written and closed, become `path`: fsync the file, rename it, fsync the directory.
    `atomic_write` ends with it; a writer that cannot stream through a file object (a memory-mapped array)
    fills `tmp_path(path)` itself and calls it."""
    path = Path(path)
    _fsync(tmp_path(path))
    os.replace(tmp_path(path), path)
    _fsync(path.parent)


def sync_files(paths: Sequence[str | Path]) -> None:
    """Make files written with `atomic_write(durable=False)` durable: fsync each, then each folder once."""
    for path in paths:
        _fsync(path)
    for folder in dict.fromkeys(Path(path).parent for path in paths):
        _fsync(folder)


def umask_mode(*paths: str | Path) -> None:
    """Give files the mode any new file gets (0666 less the umask). safetensors writes 0600 whatever the umask, so an
    exported model on shared storage was unreadable to the others the user's umask lets read it."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def within(path: str, folder: Path) -> bool:
    """Whether `path`, links resolved, is the resolved `folder` or lies below it."""
    resolved = Path(path).resolve()
    return resolved == folder or folder in resolved.parents


def spec_holding(out: Path, specs: Sequence[str]) -> str | None:
    """The folder spec that `out` lies in, if any: checked by name, so before a first run has written anything,
    since a rerun would read the outputs as inputs."""
    resolved = out.resolve()
    return next((spec for spec in specs if os.path.isdir(spec) and within(str(resolved), Path(spec).resolve())), None)


TAR_END = 2 * 512  # every complete tar archive ends with two zero blocks
_DECOMPRESSORS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}  # by magic number


def tar_is_complete(path: str | Path) -> bool:
    """Whether a tar file ends as a complete archive does: whole 512-byte blocks, the last two zero. Python's
    tarfile (and so webdataset) reads a file cut between two members, a copy that did not finish, as a complete
    and shorter archive; this tells the two apart. An unreadable file counts as complete: reading it says why.
    A gzip, bz2 or xz tar (which tarfile's `r|*` reads under any name) is checked decompressed: its own end
    blocks are compressed, and a cut one can end silently at a member boundary too."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
            decompress = next((d for magic, d in _DECOMPRESSORS.items() if head.startswith(magic)), None)
            if decompress is None:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - TAR_END))
                return _ends_as_tar(size, f.read(TAR_END))
        return _decompressed_is_complete(decompress(path, "rb"))
    except EOFError:  # the compressed stream ends before its end marker
        return False
    except (OSError, lzma.LZMAError):
        return True


def _decompressed_is_complete(stream: IO[bytes]) -> bool:
    """The end-block check of a decompressed stream, read through once (its last blocks only kept)."""
    size, tail = 0, b""
    with stream:
        while chunk := stream.read(1 << 20):
            size, tail = size + len(chunk), (tail + chunk)[-TAR_END:]
    return _ends_as_tar(size, tail)


def _ends_as_tar(size: int, tail: bytes) -> bool:
    return size >= TAR_END and size % 512 == 0 and not any(tail)


def output_file(path: str | Path, option: str) -> Path:
    """``path`` of a file a command writes when its work is done, checked before the work: not a folder, its
    folder created and writable. Failing after an hour of generation or evaluation would waste the hour."""
    path = Path(path)
    if path.is_dir():
        raise UserError(path, f"{option} is a folder; give a file name")
    _check_can_make(path.parent, path, option)
    path.parent.mkdir(parents=True, exist_ok=True)  # an OSError here names the folder (exit_on prints it)
    return path


def output_folder(path: str | Path, option: str, error: type[UserError] = UserError) -> Path:
    """``path`` of the folder a command writes its results into, checked before the work and not made (a refusal
    later in the checks leaves nothing behind): not a file, and it, or the nearest folder above it that exists,
    writable. `lvm.evaluate` scored a whole held-out set (hours for LVM-7B) before it found its --out was a file.
    `error`: the command's own UserError class, which its callers catch."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(path, f"{option} exists and is not a folder")
    _check_can_make(path, path, option, error)
    return path


def _check_can_make(folder: Path, wanted: Path, option: str, error: type[UserError] = UserError) -> None:
    """`wanted` (`folder` or a file in it) can be written: the nearest of `folder` and the folders above it that
    exists (or is a link) is a folder, and writable."""
    existing = next(place for place in (folder, *folder.absolute().parents) if place.exists() or place.is_symlink())
    rest = wanted.absolute().relative_to(existing.absolute())
    if not existing.exists():  # mkdir would fail on it after the work
        made = "" if rest == Path(".") else f", so {rest} cannot be made there"
        raise error(existing, f"{option}: a link to nothing ({os.readlink(existing)}){made}")
    if not existing.is_dir():  # a file on the way: --out results.json/eval
        raise error(existing, f"{option}: not a folder, so {rest} cannot be made in it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(existing, f"{option}: permission denied (cannot write {rest} there)")


class ShardPatternError(UserError, ValueError):
    """A shard pattern that names no shard; the message names the pattern."""


def expand_pattern(pattern: str) -> Iterator[tuple[str, list[str]]]:
    """Each name a brace pattern expands to, with the existing paths it names: a glob's matches (sorted,
    ``**`` recursive), or the name itself when it exists."""
    for name in braceexpand(pattern):
        if glob.has_magic(name):
            yield name, sorted(glob.glob(name, recursive=True))
        else:
            yield name, [name] if os.path.exists(name) else []


def pattern_names(pattern: str, path: str | Path) -> bool:
    """Whether the shard pattern `pattern` (a path, glob or brace pattern) would name `path` once it exists, or a
    folder above it, which `expand_shards` reads every .tar of: a command checks that its inputs name none of its own
    outputs before it writes the first. Glob's rules, segment by segment: `*` and `?` stay within one folder, `**`
    spans any number of folders, none included; paths are taken absolute."""
    target = os.path.abspath(path).split("/")
    return any(_names(os.path.abspath(name).split("/"), target[:depth])
               for name in braceexpand(pattern) for depth in range(1, len(target) + 1))


def _names(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":  # glob's `**` enters no hidden folder
        return any(_names(pattern[1:], parts[i:]) for i in range(len(parts) + 1)
                   if not any(part.startswith(".") for part in parts[:i]))
    if parts and parts[0].startswith(".") and not pattern[0].startswith("."):  # nor does a wildcard match one
        return parts[0] == pattern[0]
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _names(pattern[1:], parts[1:])


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths named by ``spec``: a folder (its ``*.tar``, recursively), a glob, a brace pattern, or a list.

    Order is kept as given and each folder or glob is sorted, so the same spec always lists the same shards in
    the same order (the builders and the stream derive their randomness from positions in this list). A shard
    named twice (`[tok/, tok/a.tar]`, a folder and a folder inside it, a link) is listed once, where first named:
    its images would be built, or its sentences trained on, twice.
    """
    patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for pattern in patterns:
        for name, found in expand_pattern(str(pattern)):
            if not found and not glob.has_magic(name):
                raise ShardPatternError(name, "no .tar shards found (no such file or directory)")
            shards = []
            for path in found:
                if os.path.isdir(path):
                    shards += sorted(glob.glob(os.path.join(path, "**", "*.tar"), recursive=True))
                elif path.endswith(".tar") or path == name:
                    shards.append(path)
            if not shards:
                raise ShardPatternError(name, "no .tar shards found")
            paths.extend(shards)
    if not paths:
        raise ShardPatternError(spec, "no .tar shards found")
    first = {}  # real path -> the path as first named
    for path in paths:
        first.setdefault(os.path.realpath(path), path)
    return list(first.values())
