"""The bench's plot: seconds per image by variant and ISA, naive as the baseline (a PNG beside bench.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# One colour per ISA, so a reader (and the test) can tell the groups apart; naive's baseline is grey.
ISA_COLOURS = {"avx2": "#1f77b4", "native": "#ff7f0e"}
OTHER_ISA_COLOUR = "#2ca02c"
BASELINE_COLOUR = "#7f7f7f"


def plot_bars(report: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(isa, variant, s/image, speed-up over that ISA's naive or None) per result, ISA by ISA in the
    report's order: the bars the plot draws."""
    results = list(report["results"].values())
    bars = []
    for isa in dict.fromkeys(entry["isa"] for entry in results):
        naive = report["results"].get(f"{isa}/naive")
        for entry in results:
            if entry["isa"] == isa:
                seconds = entry["seconds_per_image"]
                ratio = naive["seconds_per_image"] / seconds if naive else None
                bars.append((isa, entry["variant"], seconds, ratio))
    return bars


def write_plot(report: dict[str, Any], path: Path) -> list[tuple[str, str, float, float | None]]:
    """Write ``path`` (PNG): one bar per variant and ISA, labelled with its speed-up over naive, and a
    dashed line at each ISA's naive time. Returns the bars drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib import pyplot

    bars = plot_bars(report)
    config = report.get("config", {})
    figure, axes = pyplot.subplots(figsize=(max(6.0, 0.9 * len(bars) + 2), 4.8), dpi=100)
    positions = []
    position = 0.0
    previous_isa = None
    for isa, _, _, _ in bars:
        if previous_isa is not None and isa != previous_isa:
            position += 0.6  # a gap between ISA groups
        positions.append(position)
        position += 1.0
        previous_isa = isa
    colours = [ISA_COLOURS.get(isa, OTHER_ISA_COLOUR) for isa, _, _, _ in bars]
    drawn = axes.bar(positions, [seconds for _, _, seconds, _ in bars], width=0.7, color=colours)
    for rectangle, (_, _, seconds, ratio) in zip(drawn, bars, strict=True):
        label = f"{seconds:.1f} s" + (f"\n{ratio:.2f}x" if ratio is not None else "")
        axes.annotate(
            label,
            (rectangle.get_x() + rectangle.get_width() / 2, rectangle.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    for isa in dict.fromkeys(isa for isa, _, _, _ in bars):
        naive = report["results"].get(f"{isa}/naive")
        if naive is None:
            continue
        xs = [x for x, (bar_isa, *_) in zip(positions, bars, strict=True) if bar_isa == isa]
        axes.hlines(
            naive["seconds_per_image"],
            min(xs) - 0.45,
            max(xs) + 0.45,
            colors=BASELINE_COLOUR,
            linestyles="dashed",
            linewidth=1,
        )
    axes.set_xticks(positions, [f"{isa}\n{variant}" for isa, variant, _, _ in bars], fontsize=7, rotation=45)
    axes.set_ylabel("seconds per image (median of the processes)")
    size = f"{config.get('width', '?')}x{config.get('height', '?')}, {config.get('steps', '?')} steps"
    axes.set_title(
        f"make bench: s/image by variant and ISA ({size}); labels: speed-up over naive", fontsize=9
    )
    axes.set_ylim(0, max(seconds for _, _, seconds, _ in bars) * 1.2)
    figure.tight_layout()
    figure.savefig(path, format="png")
    pyplot.close(figure)
    return bars
