"""The one figure layout of the benchmark scripts: a metric-vs-budget line plot written to a PNG."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def line_plot(path: Path, xlabel: str, ylabel: str, title: str):
    """Yields matplotlib axes to draw on (headless); labels, grid, legend and the PNG are done on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
