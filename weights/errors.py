"""The one error of the `weights` package."""

from __future__ import annotations

from pathlib import Path


class WeightsError(Exception):
    """Weights that cannot be found or read safely; str() is '<path or id>: <problem>' on one line."""

    def __init__(self, where: str | Path, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = str(where), problem
