"""Finding, reading and atomically writing webdataset tar shards (token shards in, sentence shards out)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
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


def one_tokenizer(records: Iterable[tuple[str, dict | None]]) -> dict | None:
    """The tokenizer that made all of some shards, from (shard, `VQTokenizer.identity()` or None) pairs.

    None when no shard records one; two different digests mean tokens of two tokenizers mixed together,
    which no model can learn from, so that is an error naming a shard of each.
    """
    found: tuple[str, dict] | None = None
    for path, record in records:
        if not isinstance(record, dict) or not record.get("digest"):
            continue
        if found is None:
            found = path, record
        elif record["digest"] != found[1]["digest"]:
            raise SentenceError(
                f"{path}: made by tokenizer {record.get('name')} (digest {record['digest'][:12]}), but {found[0]} by "
                f"{found[1].get('name')} (digest {found[1]['digest'][:12]}); tokenize everything with one tokenizer"
            )
    return None if found is None else found[1]


def read_json(path: str | Path) -> dict:
    """A json object from a file, or {} when it is missing or unreadable (reports and indexes are optional)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sentences_tokenizer(paths: Sequence[str]) -> dict | None:
    """The tokenizer recorded in the `index.json` of the folders holding these sentence shards (None if none)."""
    folders = sorted({os.path.dirname(p) for p in paths})
    return one_tokenizer((folder, read_json(os.path.join(folder, "index.json")).get("tokenizer")) for folder in folders)
