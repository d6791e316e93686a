"""Progress lines of the long file jobs (`lvm.tokenize`, `lvm.annotate`) and their one-line summaries; `clock`
also times training's progress lines.

Plain log lines rather than a redrawn bar: jobs run for days under SLURM or torchrun, where
logs are files and every rank writes its own lines.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO


def log(prefix: str, message: str) -> None:
    """One log line of a tokenize or annotate job on stderr (`prefix`: the rank, when there are several)."""
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def skipped_text(skipped: Counter, earlier: Counter | None = None, outputs: str = "shards") -> str:
    """`skipped N: reason n, ...` (reasons sorted) for the summary lines of tokenize and annotate: this run's skips
    with `earlier`, those recorded in the reports of shards an earlier run completed, so that the last line of a
    resumed job still tells what the whole output lacks."""
    total = skipped + (earlier or Counter())
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(total.items()))
    before = sum((earlier or Counter()).values())
    return (f"skipped {sum(total.values()):,}{': ' + reasons if reasons else ''}"
            f"{f' ({before:,} of them in {outputs} completed by earlier runs)' if before else ''}")


def wall_text(images: int, wall_s: float) -> str:
    """`wall H:MM:SS (R images/s)` for the summary lines of tokenize and annotate."""
    rate = images / wall_s if wall_s > 0 else 0.0
    return f"wall {clock(wall_s)} ({rate:.1f} images/s)"


@dataclass
class Summary:
    """What a run did (this rank only)."""

    images: int = 0  # samples written (original images or video frames)
    derived: int = 0  # derived token arrays written (gray, masked)
    tokens: int = 0  # tokens written, derived ones included
    shards_written: int = 0
    shards_already_done: int = 0
    images_earlier: int = 0  # in the shards already complete, as their reports say
    skipped: Counter = field(default_factory=Counter)
    skipped_earlier: Counter = field(default_factory=Counter)  # in the reports of shards already complete
    wall_s: float = 0.0

    def line(self) -> str:
        """The final one-line summary."""
        return (
            f"tokenize: {self.images:,} images tokenized (+{self.derived:,} derived) in {self.shards_written} shards "
            f"({self.shards_already_done} already complete{f', {self.images_earlier:,} images' if self.shards_already_done else ''}); "
            f"{skipped_text(self.skipped, self.skipped_earlier)}; "
            f"{self.tokens:,} tokens written; {wall_text(self.images, self.wall_s)}"
        )


class Progress:
    """Prints `shards done/total | images | images/s | ETA` at most every `every_s` seconds."""

    def __init__(self, total_shards: int, prefix: str = "", every_s: float = 10.0, stream: TextIO = sys.stderr) -> None:
        self.total, self.prefix, self.every_s, self.stream = total_shards, prefix, every_s, stream
        self.start = self.last = time.monotonic()
        self.shards = 0
        self.images = 0

    def update(self, images: int = 0, shards: int = 0) -> None:
        """Record work done; print when the interval has passed or the last shard is finished."""
        self.images += images
        self.shards += shards
        now = time.monotonic()
        if now - self.last >= self.every_s or (shards and self.shards == self.total):
            self.last = now
            elapsed = now - self.start
            eta = clock(elapsed / self.shards * (self.total - self.shards)) if self.shards else "?"
            print(
                f"{self.prefix}shards {self.shards}/{self.total} | {self.images:,} images | "
                f"{self.images / max(elapsed, 1e-9):.1f} images/s | ETA {eta}",
                file=self.stream,
                flush=True,
            )

    def elapsed(self) -> float:
        return time.monotonic() - self.start
