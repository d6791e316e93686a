"""One output token shard: written under a temporary name, made visible by one atomic rename.

Completion protocol (what makes kill -9 safe): samples stream into `<name>.tar.tmp`; on commit
an earlier run's `<name>.tar` is removed, the report `<name>.report.json` is written (temporary name,
rename), then the tar is renamed to `<name>.tar`. A shard is complete exactly when `<name>.tar` exists and its report carries the
fingerprint of the current inputs and settings; anything else (a leftover `.tmp`, a report
without its tar, a shard made with other settings) is redone from scratch by the next run.
Readers that glob `*.tar` therefore never see a partial shard.

Bytes are reproducible: members in sample order with fixed mtime, owner and mode, and the
report holds no timestamps.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from common.files import atomic_write
from lvm.tokenize.decode import Skip
from sentences.formats import read_report, tar_writer, token_member, token_report

MAX_LISTED_SKIPS = 1000  # the report counts every skip but lists only the first ones


def shard_paths(out: Path, name: str) -> tuple[Path, Path]:
    """The tar and report paths of shard `name` under `out`."""
    tar = out / f"{name}.tar"
    return tar, token_report(tar)


def shard_state(out: Path, name: str, fingerprint: str) -> str:
    """'done' (complete, same inputs and settings), 'stale' (complete but made differently) or 'missing'."""
    tar, report = shard_paths(out, name)
    if not tar.exists():
        return "missing"
    return "done" if read_report(report).get("fingerprint") == fingerprint else "stale"


def recorded(report: Path) -> tuple[int, Counter]:
    """The images a complete shard's (or annotate unit's) report says it holds, and the inputs it left out by reason."""
    fields = read_report(report)
    skipped, images = fields.get("skipped"), fields.get("images")
    return (images if isinstance(images, int) else 0,
            Counter({str(k): v for k, v in skipped.items() if isinstance(v, int)}) if isinstance(skipped, dict) else Counter())


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of an array (numpy's own format, so any reader can np.load it)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class UnitReport:
    """What every unit report holds besides its own fields (`lvm.annotate`'s too), and the reports' one layout.

    Every input left out is counted by reason and the first MAX_LISTED_SKIPS are listed; the report is
    indented, key-sorted JSON written atomically, the completion point of its unit.
    """

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.skipped_items: list[dict] = []

    def skip(self, skip: Skip) -> None:
        """Count a left-out input and list it in the report (the first MAX_LISTED_SKIPS)."""
        self.skipped[skip.reason] += 1
        if len(self.skipped_items) < MAX_LISTED_SKIPS:
            self.skipped_items.append({"item": skip.item, "reason": skip.reason, "detail": skip.detail})

    def write_report(self, path: Path, fields: dict) -> None:
        """`fields` and the skips as indented, key-sorted JSON (no timestamps, so reruns give the same bytes)."""
        report = {**fields, "skipped": dict(sorted(self.skipped.items())), "skipped_items": self.skipped_items}
        with atomic_write(path, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
            f.write("\n")


class ShardWriter(UnitReport):
    """Streams samples of one unit into its temporary tar and commits tar + report at the end."""

    def __init__(self, out: Path, name: str, inputs: list[str], fingerprint: str, tokenizer: dict | None = None) -> None:
        super().__init__()
        self.tar_path, self.report_path = shard_paths(out, name)
        self.tar_path.parent.mkdir(parents=True, exist_ok=True)
        self._commit = ExitStack()  # closing it renames the tar into place
        self._tar = self._commit.enter_context(tar_writer(self.tar_path, encoder=False))  # truncates a killed run's
        self.name, self.inputs, self.fingerprint, self.tokenizer = name, inputs, fingerprint, tokenizer
        self.images = 0
        self.tokens = 0

    def add(self, key: str, meta_json: bytes, tokens: dict[str, np.ndarray]) -> None:
        """One sample: its json and one uint16 token array per variant (ORIGINAL is the image itself)."""
        sample = {"__key__": key, "json": meta_json}
        for variant, codes in tokens.items():
            sample[token_member(variant)] = npy_bytes(codes)
            self.tokens += codes.size
        self._tar.write(sample)
        self.images += 1

    def commit(self) -> None:
        """Remove an earlier run's tar, write the report, then rename the tar into place (the completion point).

        The old tar goes first: a kill between the report and the rename must not leave it beside a report
        that carries the new fingerprint, which would pass it for done.
        """
        fields = {
            "shard": self.tar_path.name,
            "inputs": self.inputs,
            "fingerprint": self.fingerprint,
            "tokenizer": self.tokenizer,  # VQTokenizer.identity(): carried into sentence shards and checkpoints
            "images": self.images,
            "tokens": self.tokens,
        }
        self.tar_path.unlink(missing_ok=True)
        self.write_report(self.report_path, fields)
        self._commit.close()
