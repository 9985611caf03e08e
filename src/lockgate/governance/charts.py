"""Bin charts for drift reports, drawn with matplotlib as self-contained SVG.

One chart per feature: the reference's share and the window's share of every bin, side by
side, with a labelled y axis (share of values). Continuous features have quantile bins
(equal reference mass, unbounded at both ends), so the bars are drawn at equal widths and
the axis says so; every edge is labelled at the boundary it sits on. Categorical and
discrete features get one bar per bin named by its code (or class name), and the bins of
values the reference never had are named ``new ...`` and hatched. Text is drawn as paths,
so the SVG needs no font and no network; the exact numbers are in the report's table
beside each chart.

matplotlib is the ``report`` extra; without it :func:`available` is False and the report
says how to install it.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .drift import FeatureDrift

REFERENCE_COLOUR = "#4c78a8"
WINDOW_COLOUR = "#f58518"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def shown_bins(f: "FeatureDrift") -> list[int]:
    """Bins worth drawing: all of them, except, for a discrete feature, the empty bins
    between its known values (a count's 0..12 would otherwise show 12 empty gaps)."""
    n = len(f.reference_fractions)
    if f.value_kind != "discrete" or not f.bin_labels:
        return list(range(n))
    counts = f.live_counts or [0.0] * n
    return [i for i in range(n) if not (f.bin_labels[i].startswith("new") and f.reference_fractions[i] == 0 and counts[i] == 0)]


def _title(f: "FeatureDrift") -> str:
    name = "class distribution" if f.index < 0 else f.feature
    return f"{f.tensor} / {name} — {f.status}"


def bin_chart_svg(f: "FeatureDrift") -> str:
    """The SVG markup (no XML prolog) of one feature's bin chart."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    shown = shown_bins(f)
    n = len(shown)
    reference = [f.reference_fractions[i] for i in shown]
    window = [f.live_fractions[i] for i in shown]
    all_labels = f.bin_labels or [str(i) for i in range(len(f.reference_fractions))]
    width = min(11.0, max(5.0, 0.45 * n + 2.0))
    fig = Figure(figsize=(width, 3.6), dpi=96)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(n))
    bar = 0.4
    ax.bar([p - bar / 2 for p in positions], reference, bar, color=REFERENCE_COLOUR, label="reference")
    live_bars = ax.bar([p + bar / 2 for p in positions], window, bar, color=WINDOW_COLOUR, label="window")
    for i, patch in zip(shown, live_bars):
        if all_labels[i].startswith("new") or all_labels[i].endswith("(new)"):
            patch.set_hatch("///")
            patch.set_edgecolor("#7a3d00")
    ax.set_ylabel("share of values")
    ax.set_ylim(0, max([*reference, *window, 0.01]) * 1.15)
    ax.grid(axis="y", alpha=0.3)
    if f.value_kind == "continuous":
        # quantile bins: label every edge at the boundary between two bars
        ax.set_xticks([p + 0.5 for p in positions[:-1]], [f"{e:.4g}" for e in f.edges], rotation=60, fontsize=7)
        ax.set_xlabel(f"{f.feature}: quantile bins of the reference (equal reference mass; outer bins unbounded)", fontsize=8)
        ax.set_xlim(-0.6, n - 0.4)
    else:
        labels = [all_labels[i] for i in shown]
        ax.set_xticks(positions, labels, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center", fontsize=7)
        axis = {"classes": "class (names from the model config)", "categorical": "category code",
                "discrete": "value"}.get(f.value_kind, "bin")  # fmt: skip
        ax.set_xlabel(f"{f.feature if f.index >= 0 else f.tensor}: {axis}; hatched = values the reference never had", fontsize=8)
    ax.set_title(_title(f), fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)  # RDF boilerplate, not content
    return re.sub(r"<svg ", '<svg role="img" class="chart" ', svg, count=1)
