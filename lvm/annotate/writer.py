"""The outputs of one task for one unit, keyed like their images, and the report that marks them complete.

A folder unit's images become files `<task folder>/<key>.png` (`cats/0001.jpg` -> `cats/0001.png`, the key
`lvm.tokenize` gives both), an input tar `<rel>.tar` becomes `<task folder>/<rel>.tar` with one `<key>.png`
per sample, so tokenizing the task folder yields the keys of the images' tokens. Completion follows the
tokenize writer: files and tars are written under temporary names (`*.tmp`, which no reader takes) and
renamed, then `<unit>.report.json` is written with the fingerprint of inputs and settings; a unit is complete
exactly when its report (and for a tar unit the tar) exists with the current fingerprint. Anything else is
redone from scratch. PNG encoding runs on a thread pool (zlib releases the GIL), in order for tars.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from webdataset import TarWriter

from lvm.tokenize.decode import Skip
from lvm.tokenize.sources import Unit
from lvm.tokenize.writer import MAX_LISTED_SKIPS, shard_paths

Encode = Callable[[], bytes]


def is_done(root: Path, unit: Unit, fingerprint: str) -> bool:
    """Whether the unit's outputs under `root` are complete and made from the same inputs and settings."""
    tar, report = shard_paths(root, unit.name)
    if unit.kind == "tar" and not tar.exists():
        return False
    try:
        return json.loads(report.read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class UnitOutput:
    """Collects one task's annotations of one unit and commits them with the report."""

    def __init__(self, root: Path, task: str, unit: Unit, fingerprint: str, pool: ThreadPoolExecutor) -> None:
        self.root, self.task, self.unit, self.fingerprint, self.pool = root, task, unit, fingerprint, pool
        self.tar_path, self.report_path = shard_paths(root, unit.name)
        self.tar_path.parent.mkdir(parents=True, exist_ok=True)
        self.pending: list[tuple[str, Future]] = []
        self.images = 0
        self.skipped: Counter[str] = Counter()
        self.skipped_items: list[dict] = []
        self._file = self._tar = None
        if unit.kind == "tar":
            self._file = open(self.tar_path.with_name(self.tar_path.name + ".tmp"), "wb")
            self._tar = TarWriter(self._file, user="", group="", mode=0o644, mtime=0, encoder=False)

    def add(self, key: str, encode: Encode) -> None:
        """One annotation, encoded on the pool: a file `<key>.png`, or the member `<key>.png` of the tar."""
        if self._tar is None:
            self.pending.append((key, self.pool.submit(lambda: _write_file(self.root / f"{key}.png", encode()))))
        else:
            self.pending.append((key, self.pool.submit(encode)))
            self._drain(block=False)
        self.images += 1

    def _drain(self, block: bool) -> None:
        """Write finished encodings (tar: in sample order); raise what a pool task raised."""
        while self.pending and (block or self.pending[0][1].done()):
            key, future = self.pending.pop(0)
            data = future.result()
            if self._tar is not None:
                self._tar.write({"__key__": key, "png": data})

    def skip(self, skip: Skip) -> None:
        """Count an input left out and list it in the report (the first MAX_LISTED_SKIPS)."""
        self.skipped[skip.reason] += 1
        if len(self.skipped_items) < MAX_LISTED_SKIPS:
            self.skipped_items.append({"item": skip.item, "reason": skip.reason, "detail": skip.detail})

    def commit(self) -> None:
        """Finish every write, rename the tar into place, then write the report (the completion point)."""
        self._drain(block=True)
        if self._tar is not None:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._file.name, self.tar_path)
        report = {
            "task": self.task,
            "unit": self.unit.name,
            "inputs": [item.path for item in self.unit.items],
            "fingerprint": self.fingerprint,
            "images": self.images,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_items": self.skipped_items,
        }
        _write_file(self.report_path, (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
