"""Finding, reading and atomically writing webdataset tar shards (token shards in, sentence shards out)."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import webdataset as wds
from webdataset.shardlists import expand_urls

from sentences.errors import SentenceError


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths named by ``spec``: a folder (its ``*.tar``, recursively), a glob, a brace pattern, or a list.

    Order is kept as given and each folder or glob is sorted, so the same spec always lists the same shards in
    the same order (the builders and the stream derive their randomness from positions in this list).
    """
    patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for pattern in patterns:
        for item in expand_urls(str(pattern)):
            if os.path.isdir(item):
                found = sorted(glob.glob(os.path.join(item, "**", "*.tar"), recursive=True))
            elif glob.has_magic(item):
                found = sorted(p for p in glob.glob(item) if p.endswith(".tar"))
            else:
                found = [item] if os.path.isfile(item) else []
            if not found:
                raise SentenceError(f"{item}: no .tar shards found")
            paths.extend(found)
    if not paths:
        raise SentenceError(f"{spec}: no .tar shards found")
    return paths


def iter_samples(path: str, on_error: Callable[[Exception], bool] = wds.reraise_exception) -> Iterator[dict]:
    """Samples of one tar shard as webdataset dicts (``__key__`` plus raw bytes per member extension).

    ``on_error`` is webdataset's handler: return True to skip what failed (a truncated tar ends the shard),
    or raise to stop.
    """
    yield from wds.tarfile_samples([{"url": path}], handler=on_error)


@contextmanager
def atomic_tar(path: str | Path) -> Iterator[wds.TarWriter]:
    """A TarWriter on ``<path>.tmp`` renamed to ``path`` only when the block completes.

    A killed job therefore leaves either a complete shard or a ``.tmp`` file that the next run deletes and redoes.
    Member mtimes are fixed so that the same content always gives the same bytes.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, mtime=0)  # an int: a float mtime adds a 1 KB pax header per member
        yield writer
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
