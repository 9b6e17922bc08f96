"""PNG bar charts with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def bar_chart(
    path: str | os.PathLike[str],
    title: str,
    panels: Sequence[tuple[str, Mapping[str, float]]],
    *,
    subtitle: str | None = None,
) -> Path:
    """One horizontal bar panel per ``(label, {bar name: value})``, side by side.

    Each bar carries its value, so the chart reads without the table.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    bars = max((len(values) for _label, values in panels), default=1)
    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    figure, grid = plt.subplots(
        rows, columns, figsize=(5.2 * columns, (0.5 * bars + 1.1) * rows + 0.6), squeeze=False
    )
    axes = [axis for row in grid for axis in row]
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    colours = ["#b0b0b0", "#7aa6d6", "#2f6db3", "#1b9e77", "#d95f02", "#7570b3"]
    for index, (axis, (label, values)) in enumerate(zip(axes, panels, strict=False)):
        names = list(values)
        numbers = [float(values[name]) for name in names]
        positions = range(len(names))
        axis.barh(positions, numbers, color=[colours[i % len(colours)] for i in positions])
        axis.set_yticks(list(positions), names)
        axis.invert_yaxis()
        axis.set_title(label, fontsize=10)
        axis.spines[["top", "right"]].set_visible(False)
        top = max(numbers, default=0.0) or 1.0
        axis.set_xlim(0, top * 1.25)
        for position, number in zip(positions, numbers, strict=True):
            text = f"{number:,.0f}" if number >= 100 else f"{number:.3g}"
            axis.text(number + top * 0.01, position, text, va="center", fontsize=8)
        if index % columns:
            axis.set_yticklabels([])  # the row's first panel names the bars
    figure.suptitle(title, fontsize=12, x=0.01, ha="left")
    if subtitle:
        figure.text(0.01, 0.005, subtitle, fontsize=7, color="#555555")
    figure.tight_layout(rect=(0, 0.04 if subtitle else 0, 1, 0.95))
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target
