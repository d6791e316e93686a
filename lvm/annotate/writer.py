"""The outputs of one task for one unit, keyed like their images, and the report that marks them complete.

A folder unit's images become files `<task folder>/<key>.png` (`cats/0001.jpg` -> `cats/0001.png`, the key
`lvm.tokenize` gives both), an input tar `<rel>.tar` becomes `<task folder>/<rel>.tar` with one `<key>.png`
per sample, so tokenizing the task folder yields the keys of the images' tokens. Completion follows the
tokenize writer: files and tars are written with `common.files.atomic_write` (under `*.tmp`, which no reader
takes, then renamed; a folder unit's maps are fsynced in one pass at the end, 1.7-9x faster than one by one), then
`<unit>.report.json` is written with the fingerprint of inputs and settings; a unit is complete exactly when its report (and for a tar unit the tar) exists with the current
fingerprint. Anything else is redone from scratch; a folder unit redone removes the maps its previous report listed
that the new run does not write (an image deleted or become unreadable since). PNG encoding runs on a thread pool
(zlib releases the GIL), in order for tars.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from common.files import atomic_write, sync_files, within
from lvm.tokenize.sources import Unit, image_keys
from lvm.tokenize.writer import UnitReport, shard_paths
from sentences.formats import read_report, tar_writer

Encode = Callable[[], bytes]


def is_done(root: Path, unit: Unit, fingerprint: str) -> bool:
    """Whether the unit's outputs under `root` are complete and made from the same inputs and settings: for a tar
    unit its tar is there, for a folder unit every map its report lists (one stat each; reports written before they
    listed their maps are taken at their word)."""
    tar, report = shard_paths(root, unit.name)
    if unit.kind == "tar" and not tar.exists():
        return False
    fields = read_report(report)
    maps = fields.get("maps") if unit.kind == "images" else None
    return fields.get("fingerprint") == fingerprint and all((root / f"{key}.png").exists() for key in maps or ())


def _write_png(path: Path, encode: Encode) -> Path:
    """Encode one annotation and write it under its final name by a rename; `<key>.png` may lie in a subfolder of
    the task folder. Not fsynced here: `UnitOutput.commit` syncs the unit's maps in one pass before its report."""
    data = encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, durable=False) as file:
        file.write(data)
    return path


class UnitOutput(UnitReport):
    """Collects one task's annotations of one unit and commits them with the report."""

    def __init__(
        self, root: Path, task: str, unit: Unit, fingerprint: str, pool: ThreadPoolExecutor, listed: Container[str] = (),
    ) -> None:
        super().__init__()
        self.root, self.task, self.unit, self.fingerprint, self.pool = root, task, unit, fingerprint, pool
        self.listed = listed  # the keys of the run's whole listing: an earlier map whose image moved to a unit before
        self.tar_path, self.report_path = shard_paths(root, unit.name)
        self.tar_path.parent.mkdir(parents=True, exist_ok=True)
        # Not complete under any settings from here until commit: a run killed while redoing the unit with other
        # settings would otherwise leave maps of both, which the old report calls complete under the old ones.
        # A folder unit's report stays, without a fingerprint, to name the earlier maps until commit removes those
        # no longer made: a kill in between leaves them listed for the next run.
        self.earlier_maps: list[str] = read_report(self.report_path).get("maps", []) if unit.kind == "images" else []
        if self.earlier_maps:
            self.write_report(self.report_path, {"task": task, "unit": unit.name, "maps": self.earlier_maps})
        else:
            self.report_path.unlink(missing_ok=True)
        self.pending: list[tuple[str, Future]] = []
        self.written: list[Path] = []  # a folder unit's maps, synced at commit
        self.images = 0
        self._commit = ExitStack()  # closing it renames the tar into place
        self._tar = self._commit.enter_context(tar_writer(self.tar_path, encoder=False)) if unit.kind == "tar" else None

    def add(self, key: str, encode: Encode) -> None:
        """One annotation, encoded on the pool: a file `<key>.png`, or the member `<key>.png` of the tar."""
        if self._tar is None:
            self.pending.append((key, self.pool.submit(_write_png, self.root / f"{key}.png", encode)))
        else:
            self.pending.append((key, self.pool.submit(encode)))
            self._drain(block=False)
        self.images += 1

    def _drain(self, block: bool) -> None:
        """Write finished encodings (tar: in sample order); raise what a pool task raised."""
        while self.pending and (block or self.pending[0][1].done()):
            key, future = self.pending.pop(0)
            result = future.result()
            if self._tar is None:
                self.written.append(result)
            else:
                self._tar.write({"__key__": key, "png": result})

    def commit(self) -> None:
        """Finish every write, rename the tar into place or make the maps durable, then write the report (the
        completion point)."""
        self._drain(block=True)
        self._commit.close()
        sync_files(self.written)
        maps = [path.relative_to(self.root).with_suffix("").as_posix() for path in self.written]
        mine = set(image_keys(self.unit))  # a folder image's map is named by its key
        for key in set(self.earlier_maps) - set(maps):
            gone = key in mine or key not in self.listed  # unreadable now, or deleted (not moved to another unit)
            if gone and within(str(self.root / f"{key}.png"), self.root.resolve()):  # a report edited by hand: nothing else
                (self.root / f"{key}.png").unlink(missing_ok=True)
        fields = {
            "task": self.task,
            "unit": self.unit.name,
            "inputs": [item.path for item in self.unit.items],
            "fingerprint": self.fingerprint,
            "images": self.images,
        }
        if self._tar is None:  # a folder unit: the maps it wrote, so a rerun sees one that was lost
            fields["maps"] = maps
        self.write_report(self.report_path, fields)
