"""Drift reports for operators: a rich table for the terminal, a self-contained HTML page.

The HTML has no external assets: per feature an inline SVG draws the reference and live
bin fractions side by side, so a shift is visible at a glance.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import DriftConfig
from .drift import DRIFT, OK, WARN, DriftReport, FeatureDrift, evaluate, load_windows, window_dir
from .profile import ReferenceProfile
from .state import merge_all

_COLOURS = {OK: "green", WARN: "yellow", DRIFT: "red"}


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compute_report(
    model_repository: str | Path,
    state_dir: str | Path,
    model: str,
    version: str | None = None,
    windows: int | None = 1,
    config: DriftConfig | None = None,
) -> DriftReport:
    """Evaluate the newest ``windows`` persisted windows (merged; all if None) against the profile."""
    if version is None:
        version = latest_version(state_dir, model)
    profile_path = ReferenceProfile.path_for(model_repository, model, version)
    if not profile_path.exists():
        raise FileNotFoundError(f"no reference profile at {profile_path}; build one with `lockgate profile build`")
    states = load_windows(state_dir, model, version, windows)
    if not states:
        raise FileNotFoundError(f"no drift windows under {window_dir(state_dir, model, version)}")
    merged = merge_all(states)
    return evaluate(merged, ReferenceProfile.load(profile_path), config or DriftConfig(), window=len(states))


def window_history(
    model_repository: str | Path,
    state_dir: str | Path,
    model: str,
    version: str,
    last: int = 20,
    config: DriftConfig | None = None,
) -> list[DriftReport]:
    """Each of the newest ``last`` persisted windows evaluated on its own against the profile:
    how one version's drift moved window by window (the console charts it)."""
    profile_path = ReferenceProfile.path_for(model_repository, model, version)
    if not profile_path.exists():
        raise FileNotFoundError(f"no reference profile at {profile_path}; build one with `lockgate profile build`")
    profile = ReferenceProfile.load(profile_path)
    states = load_windows(state_dir, model, version, last)
    return [evaluate(state, profile, config or DriftConfig(), window=index) for index, state in enumerate(states)]


def versions_with_windows(state_dir: str | Path, model: str) -> list[str]:
    root = Path(state_dir) / "drift" / model
    versions = [p.name for p in root.iterdir() if p.is_dir() and any(p.glob("window-*.bin"))] if root.is_dir() else []
    return sorted(versions, key=lambda v: (0, int(v)) if v.isdigit() else (1, v))


def latest_version(state_dir: str | Path, model: str) -> str:
    versions = versions_with_windows(state_dir, model)
    if not versions:
        raise FileNotFoundError(f"no drift windows for model {model!r} under {Path(state_dir) / 'drift' / model}")
    return versions[-1]


def table(report: DriftReport) -> Table:
    out = Table(
        title=f"Drift: {report.model} v{report.version} — {report.rows} rows, status {report.status}"
        + ("" if report.evaluated else " (too few rows to alert)")
    )
    for column in ("tensor", "feature", "rows", "PSI", "PSI thr", "JS", "JS thr", "KS", "W1/σ", "χ² p", "status"):
        out.add_column(column, justify="left" if column in ("tensor", "feature", "status") else "right")
    for f in report.features:
        colour = _COLOURS.get(f.status, "white")
        out.add_row(
            f.tensor, f.feature if f.index >= 0 else "(classes)", str(f.rows),
            _num(f.psi), _num(f.psi_threshold, 2), _num(f.js), _num(f.js_threshold, 2), _num(f.ks),
            _num(f.wasserstein), "-" if f.chi2_p is None else f"{f.chi2_p:.2e}", f"[{colour}]{f.status}[/{colour}]",
        )  # fmt: skip
    return out


def print_report(report: DriftReport, console: Console | None = None) -> None:
    (console or Console()).print(table(report))


def bins_svg(feature: FeatureDrift, width: int = 520, height: int = 150) -> str:
    ref, live = feature.reference_fractions, feature.live_fractions
    n = max(len(ref), 1)
    top = max([*ref, *live, 1e-9])
    pad = 20
    slot = (width - 2 * pad) / n
    bar = max(slot / 2 - 1, 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>')
    for i in range(n):
        x = pad + i * slot
        for k, (values, colour) in enumerate(((ref, "#4c78a8"), (live, "#f58518"))):
            v = values[i] if i < len(values) else 0.0
            h = (height - 2 * pad) * v / top
            label = "reference" if k == 0 else "live"
            parts.append(
                f'<rect x="{x + k * bar:.1f}" y="{height - pad - h:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>bin {i} {label}: {v:.4f}</title></rect>"
            )
    parts.append(f'<text x="{pad}" y="12" font-size="11" fill="#4c78a8">■ reference</text>')
    parts.append(f'<text x="{pad + 90}" y="12" font-size="11" fill="#f58518">■ live</text>')
    if feature.edges:
        parts.append(f'<text x="{pad}" y="{height - 4}" font-size="10">{feature.edges[0]:.3g}</text>')
        parts.append(f'<text x="{width - pad - 40}" y="{height - 4}" font-size="10">{feature.edges[-1]:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_html(report: DriftReport, path: str | Path, extra_html: str = "") -> Path:
    """``extra_html``: more sections (the feature-importance one), placed after the features."""
    path = Path(path)
    rows = []
    for f in report.features:
        colour = {"OK": "#2e7d32", "WARN": "#ed6c02", "DRIFT": "#c62828"}.get(f.status, "#000")
        name = html.escape(f"{f.tensor} / {f.feature if f.index >= 0 else '(classes)'}")
        stats = (
            f"PSI {_num(f.psi)} (thr {_num(f.psi_threshold, 2)}) · JS {_num(f.js)} (thr {_num(f.js_threshold, 2)}) · "
            f"KS {_num(f.ks)} · W1/σ {_num(f.wasserstein)}" + ("" if f.chi2_p is None else f" · χ² p {f.chi2_p:.2e}")
        )
        rows.append(
            f'<div class="f"><h3>{name} <span style="color:{colour}">{f.status}</span></h3>'
            f"<p>{html.escape(stats)} · rows {f.rows} · NaN {f.nan} · Inf {f.inf}</p>{bins_svg(f)}</div>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>Drift report {html.escape(report.model)} v{html.escape(report.version)}</title>
<style>body{{font-family:sans-serif;margin:2em}} .f{{display:inline-block;vertical-align:top;margin:0 1em 1em 0;
border:1px solid #ddd;padding:.5em}} h3{{margin:.2em 0}} p{{font-size:12px;margin:.2em 0}}</style></head><body>
<h1>Drift report: {html.escape(report.model)} version {html.escape(report.version)}</h1>
<p>Status <b>{report.status}</b> over {report.rows} rows
({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(report.start))} – {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(report.end))} UTC){'' if report.evaluated else ' — too few rows to alert'}.</p>
{''.join(rows)}
{extra_html}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
