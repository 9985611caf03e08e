"""Inline SVG charts for the console (no script, no external assets), each with a text title
and description for screen readers; the pages show the same numbers in a table beside them."""

from __future__ import annotations

import html
from typing import Sequence

from lockgate.governance.charts import REFERENCE_COLOUR, WINDOW_COLOUR
from lockgate.governance.drift import DriftReport, FeatureDrift

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


def bins_svg(feature: FeatureDrift, width: int = 520, height: int = 150) -> str:
    """Reference and window share of every bin of one feature, named by the report's bin labels
    (the console must not need matplotlib; ``lockgate drift report --html`` draws the full chart)."""
    ref, live = feature.reference_fractions, feature.live_fractions
    names = feature.bin_labels
    n = max(len(ref), 1)
    top = max([*ref, *live, 1e-9])
    pad = 20
    slot = (width - 2 * pad) / n
    bar = max(slot / 2 - 1, 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>')
    for i in range(n):
        x = pad + i * slot
        for k, (values, colour) in enumerate(((ref, REFERENCE_COLOUR), (live, WINDOW_COLOUR))):
            v = values[i] if i < len(values) else 0.0
            h = (height - 2 * pad) * v / top
            label = "reference" if k == 0 else "live"
            parts.append(
                f'<rect x="{x + k * bar:.1f}" y="{height - pad - h:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{html.escape(names[i] if i < len(names) else f'bin {i}')} {label}: {v:.4f}</title></rect>"
            )
    parts.append(f'<text x="{pad}" y="12" font-size="11" fill="{REFERENCE_COLOUR}">■ reference</text>')
    parts.append(f'<text x="{pad + 90}" y="12" font-size="11" fill="{WINDOW_COLOUR}">■ live</text>')
    if feature.edges:
        parts.append(f'<text x="{pad}" y="{height - 4}" font-size="10">{feature.edges[0]:.3g}</text>')
        parts.append(f'<text x="{width - pad - 40}" y="{height - 4}" font-size="10">{feature.edges[-1]:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)
