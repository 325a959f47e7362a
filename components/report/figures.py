"""The report's plots, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Uses `matplotlib.figure.Figure` directly rather than pyplot: no global figure state, no GUI
backend, safe inside a pipeline worker.  Every plot copes with empty data by saying so on
the canvas instead of failing.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100  # pixels per inch of the PNGs
WIDE = (10.0, 3.6)  # inches, a full-width row of panels
NORM_BINS = 50  # histogram bins for the vector norms
POSITIVE_COLOR = "tab:blue"
NEGATIVE_COLOR = "tab:red"
EMPTY_TEXT_SIZE = 12


def to_png(figure: Figure) -> bytes:
    """Renders a figure to PNG bytes."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _say_empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=EMPTY_TEXT_SIZE, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def pair_distance_histogram(histogram: dict) -> bytes:
    """Overlaid histograms of positive and negative pair distances (summary.json `histogram`).

    Each is shown as the fraction of its own pairs per bin, since negative pairs usually
    outnumber positive ones by far.
    """
    figure = Figure(figsize=WIDE)
    ax = figure.add_subplot()
    edges = np.asarray(histogram.get("bin_edges") or [], dtype=float)
    distance = histogram.get("distance", "distance")
    drawn = False
    for key, color in (("positive", POSITIVE_COLOR), ("negative", NEGATIVE_COLOR)):
        counts = np.asarray(histogram.get(key) or [], dtype=float)
        if len(edges) != len(counts) + 1 or counts.sum() <= 0:
            continue
        ax.stairs(
            counts / counts.sum(),
            edges,
            fill=True,
            alpha=0.4,
            color=color,
            label=f"{key} pairs ({int(counts.sum()):,})",
        )
        drawn = True
    if drawn:
        ax.set_xlabel(f"{distance} distance between normalized vectors")
        ax.set_ylabel("fraction of pairs per bin")
        ax.set_title("Pair distances: positive (same identity) vs negative")
        ax.legend()
    else:
        _say_empty(ax, "no pairs in this run")
    return to_png(figure)


def norm_distributions(l2_norm: np.ndarray, l2_norm_z: np.ndarray) -> bytes:
    """Histograms of the raw L2 norms and of their z-scores, over all valid boxes.

    Only finite values are drawn (a histogram's range must be finite); the pipeline writes
    no other, but a report also reads outputs it did not write.
    """
    figure = Figure(figsize=WIDE)
    for index, (values, title, label) in enumerate(
        (
            (l2_norm, "Raw L2 norm of valid boxes", "L2 norm (embedding units)"),
            (l2_norm_z, "Z-scored L2 norm", "(norm - mean) / std"),
        )
    ):
        ax = figure.add_subplot(1, 2, index + 1)
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            _say_empty(ax, "no valid boxes with a finite value")
            continue
        ax.hist(values, bins=NORM_BINS, color="tab:green", alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel(label)
        ax.set_ylabel("boxes")
    return to_png(figure)


def norms_by_position(l2_norm: np.ndarray, level: np.ndarray, anchor: np.ndarray) -> bytes:
    """Box plots of the raw L2 norm per grid level and per anchor slot."""
    figure = Figure(figsize=WIDE)
    for index, (slots, name) in enumerate(((level, "level"), (anchor, "anchor slot"))):
        ax = figure.add_subplot(1, 2, index + 1)
        if len(l2_norm) == 0:
            _say_empty(ax, "no valid boxes")
            continue
        keys = np.unique(slots)
        ax.boxplot([l2_norm[slots == key] for key in keys], showfliers=False)
        ax.set_xticks(np.arange(1, len(keys) + 1), [str(key) for key in keys])
        ax.set_title(f"L2 norm per {name}")
        ax.set_xlabel(name)
        ax.set_ylabel("L2 norm")
    return to_png(figure)


def curves(series: dict[str, list[float]], title: str, xlabel: str, ylabel: str) -> bytes:
    """Line plot of named series over their index (e.g. loss per epoch)."""
    figure = Figure(figsize=WIDE)
    ax = figure.add_subplot()
    drawn = False
    for name, values in series.items():
        values = np.asarray(values, dtype=float)
        if len(values):
            ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=name)
            drawn = True
    if drawn:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
    else:
        _say_empty(ax, "nothing recorded")
    return to_png(figure)


def trends(dates: list[str], panels: dict[str, dict[str, list]]) -> bytes:
    """One panel per metric group, each a line per series over the run dates (None = gap)."""
    columns = 2
    rows = max(1, -(-len(panels) // columns))
    figure = Figure(figsize=(WIDE[0], WIDE[1] * rows))
    x = np.arange(len(dates))
    for index, (title, series) in enumerate(panels.items()):
        ax = figure.add_subplot(rows, columns, index + 1)
        for name, values in series.items():
            y = np.array([np.nan if value is None else value for value in values], dtype=float)
            ax.plot(x, y, marker="o", label=name)
        ax.set_title(title)
        ax.set_xticks(x, dates, rotation=45, ha="right", fontsize="small")
        if len(series) > 1:
            ax.legend(fontsize="small")
    return to_png(figure)
