"""Inline SVG charts for the console (no script, no external assets), each with a text title
and description for screen readers; the pages show the same numbers in a table beside them."""

from __future__ import annotations

import html
from typing import Sequence

from lockgate.governance.drift import DriftReport

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")


def psi_over_windows(history: Sequence[DriftReport], *, title: str, width: int = 640, height: int = 220,
                     features: int = 5) -> str:
    """PSI of the most drifted features, window by window, with each feature's threshold."""
    series: dict[str, list[float | None]] = {}
    thresholds: dict[str, float | None] = {}
    for index, report in enumerate(history):
        for f in report.features:
            if f.index < 0:
                continue
            label = f"{f.tensor}/{f.feature}"
            series.setdefault(label, [None] * len(history))[index] = f.psi
            thresholds[label] = f.psi_threshold
    ranked = sorted(series, key=lambda k: max((v for v in series[k] if v is not None), default=0.0), reverse=True)
    shown = ranked[:features]
    values = [v for k in shown for v in series[k] if v is not None] + [t for k in shown if (t := thresholds[k])]
    top = max(values + [0.05]) * 1.1
    pad_l, pad_r, pad_t, pad_b = 44, 150, 24, 28
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    n = max(len(history), 1)

    def x(i: int) -> float:
        return pad_l + (plot_w * (i / (n - 1)) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return pad_t + plot_h * (1 - v / top)

    desc = "; ".join(f"{k}: latest PSI {next((v for v in reversed(series[k]) if v is not None), 0):.3f}" for k in shown)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-labelledby="t d"><title id="t">{html.escape(title)}</title>'
             f'<desc id="d">{html.escape(desc or "no windows yet")}</desc>',
             f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" stroke="#555"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + plot_h}" stroke="#555"/>',
             f'<text x="4" y="{pad_t + 4}" font-size="11">{top:.2f}</text>',
             f'<text x="4" y="{pad_t + plot_h}" font-size="11">0</text>',
             f'<text x="{pad_l}" y="{height - 6}" font-size="11">window 1</text>',
             f'<text x="{pad_l + plot_w - 50}" y="{height - 6}" font-size="11">window {n}</text>']
    for k, label in enumerate(shown):
        colour = PALETTE[k % len(PALETTE)]
        points = [(x(i), y(v)) for i, v in enumerate(series[label]) if v is not None]
        if len(points) > 1:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                         + " ".join(f"{px:.1f},{py:.1f}" for px, py in points) + '"/>')
        for px, py in points:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>')
        threshold = thresholds[label]
        if threshold:
            parts.append(f'<line x1="{pad_l}" y1="{y(threshold):.1f}" x2="{pad_l + plot_w}" y2="{y(threshold):.1f}" '
                         f'stroke="{colour}" stroke-dasharray="4 3" stroke-opacity="0.6"/>')
        parts.append(f'<rect x="{width - pad_r + 10}" y="{pad_t + 16 * k}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{width - pad_r + 24}" y="{pad_t + 16 * k + 9}" font-size="11">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)
