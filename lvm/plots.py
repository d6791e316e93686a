"""The figures the reports write (evaluate's perplexity curves, the probe's accuracy, the demo's loss), made one way.

matplotlib's `Figure` is used without pyplot: no backend is switched and no global figure state is kept, so
importing a report module changes nothing for a caller (a notebook keeps its backend). A figure is written with
`common.files.atomic_write`, like the reports beside it: whole or absent.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from common.files import atomic_write


def new_figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    """A figure of `size` inches at 120 dpi with one set of axes."""
    figure = Figure(figsize=size, dpi=120)
    return figure, figure.subplots()


def save_figure(figure: Figure, path: str | Path) -> None:
    """Lay the figure out and write it as a PNG."""
    figure.tight_layout()
    with atomic_write(path) as file:
        figure.savefig(file, format="png")
