"""Line charts as inline SVG, drawn on the server: no charting library, nothing to vendor or build.

The live region is re-rendered and swapped in over Server-Sent Events, so a chart is just markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

WIDTH, HEIGHT, PAD = 360, 110, 4
COLOURS = ("#2563eb", "#d97706", "#dc2626", "#059669")


def line_chart(title: str, series: Mapping[str, Sequence[tuple[int, float]]], unit: str = "", note: str = "") -> str:
    """One small chart of a few series sharing a time axis; the latest value of each is printed too."""
    points = [p for values in series.values() for p in values]
    header = f'<div class="chart"><div class="chart-title">{escape(title)}'
    if note:
        header += f' <span class="note">{escape(note)}</span>'
    header += "</div>"
    if not points:
        return header + '<div class="empty">no telemetry yet</div></div>'
    t0, t1 = min(t for t, _ in points), max(t for t, _ in points)
    top = max(v for _, v in points) or 1.0
    span = max(1, t1 - t0)
    lines, legend = [], []
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(
            f"{PAD + (t - t0) / span * (WIDTH - 2 * PAD):.1f},{HEIGHT - PAD - v / top * (HEIGHT - 2 * PAD):.1f}"
            for t, v in values)
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        latest = f"{values[-1][1]:.3g}" if values else "–"
        legend.append(f'<span style="color:{colour}">{escape(name)} <b class="latest" data-series="'
                      f'{escape(name)}">{latest}</b>{escape(unit)}</span>')
    svg = (f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
           f'aria-label="{escape(title)}"><rect width="{WIDTH}" height="{HEIGHT}" fill="#f8fafc"/>'
           + "".join(lines) + f'<text x="{WIDTH - PAD}" y="12" text-anchor="end" font-size="10">'
           f'{top:.3g}{escape(unit)}</text></svg>')
    return header + svg + '<div class="legend">' + " ".join(legend) + "</div></div>"
