"""Outcome reports for operators: a rich table for the terminal, a self-contained HTML page.

The HTML page draws its charts with matplotlib (the ``reports`` extra) as inline SVG: quality
over time per version, the confusion matrix, the calibration curve, and selection rates per
protected group with their Wilson intervals, beside a fairness table. It references no
external asset, so it opens offline.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

_PLOTTED = {"binary": ("accuracy", "f1", "auc", "ece"), "multiclass": ("accuracy", "f1", "auc", "ece"),
            "regression": ("mae", "rmse", "r2")}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    ci = entry.get("ci")
    text = _fmt(entry["value"])
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


# -- terminal -----------------------------------------------------------------------------------
def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    metrics = _PLOTTED.get(report["task"], ())
    table = Table(title=f"Outcomes: {report['model']} ({report['task']}, windows of {report['window_seconds']:g} s)")
    for column in ("version", "predictions", "labeled", "coverage", "delay p50 s", *metrics):
        table.add_column(column, justify="right" if column != "version" else "left")
    for version, data in report["versions"].items():
        total = data["total"]
        if total is None:
            continue
        q = total["quality"]
        table.add_row(version, str(q["predictions"]), str(q["labeled"]), _fmt(q["coverage"], 3),
                      _fmt(q["delay_s"]["p50"], 0), *(_fmt(q["metrics"].get(m, {}).get("value")) for m in metrics))
    console.print(table)
    for version, data in report["versions"].items():
        if not data["total"] or not data["total"]["fairness"]:
            continue
        fair = Table(title=f"Fairness, version {version} (favourable outcome: {report['favourable_outcome']})")
        for column in ("segment", "group", "n", "selection rate [95% CI]", "SPD", "DIR", "TPR", "FPR", "accuracy", "breach"):
            fair.add_column(column)
        for segment in data["total"]["fairness"]:
            breached = {b["group"] for b in segment["breaches"]}
            for group in segment["groups"]:
                mark = "[red]yes[/]" if group["group"] in breached else ""
                if group["group"] == segment["reference"]:
                    mark = "(reference)"
                fair.add_row(segment["segment"], group["group"], str(group["n"]), _ci(group["selection_rate"]),
                             _fmt((group["spd"] or {}).get("value"), 3), _fmt((group["dir"] or {}).get("value"), 3),
                             _fmt(group["tpr"]["value"], 3), _fmt(group["fpr"]["value"], 3),
                             _fmt(group["accuracy"]["value"], 3), mark)
        console.print(fair)


# -- HTML ---------------------------------------------------------------------------------------
def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    text = buffer.getvalue()
    return text[text.find("<svg"):]


def _quality_chart(report: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    metrics = _PLOTTED.get(report["task"], ())
    series = {v: d["windows"] for v, d in report["versions"].items() if d["windows"]}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(3.2 * (len(metrics) + 1), 2.8), squeeze=False)
    for version, windows in series.items():
        x = [w["window"] * report["window_seconds"] for w in windows]
        axes[0][0].plot(x, [w["quality"]["coverage"] or 0.0 for w in windows], marker="o", label=f"v{version}")
        for ax, metric in zip(axes[0][1:], metrics):
            y = [w["quality"]["metrics"].get(metric, {}).get("value") for w in windows]
            ax.plot(x, [float("nan") if v is None else v for v in y], marker="o", label=f"v{version}")
    for ax, title in zip(axes[0], ("label coverage", *metrics)):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("window start (unix s)", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    return _svg(fig)


def _confusion_chart(classes: list[str], matrix: list[list[int]], title: str) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(0.8 * len(classes) + 2, 0.8 * len(classes) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, fontsize=8, rotation=30)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    ax.set_title(title, fontsize=9)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    return _svg(fig)


def _calibration_chart(report: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    curves = {v: d["total"]["quality"]["metrics"].get("calibration") for v, d in report["versions"].items() if d["total"]}
    curves = {v: c for v, c in curves.items() if c}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999", linewidth=1)
    for version, cal in curves.items():
        points = [(b["mean_predicted"], b["observed"]) for b in cal["curve"] if b["count"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"v{version} (ECE {_fmt(cal['ece'], 3)})")
    ax.set_title(next(iter(curves.values()))["kind"], fontsize=8)
    ax.set_xlabel("mean predicted", fontsize=8)
    ax.set_ylabel("observed", fontsize=8)
    ax.legend(fontsize=7)
    return _svg(fig)


def _fairness_chart(segment: dict[str, Any], version: str) -> str | None:
    import matplotlib.pyplot as plt

    groups = [g for g in segment["groups"] if g["selection_rate"]["value"] is not None]
    if not groups:
        return None
    values = [g["selection_rate"]["value"] for g in groups]
    low = [v - (g["selection_rate"]["ci"] or [v, v])[0] for v, g in zip(values, groups)]
    high = [(g["selection_rate"]["ci"] or [v, v])[1] - v for v, g in zip(values, groups)]
    colours = ["#4c78a8" if g["selection_rate"]["eligible"] else "#bbb" for g in groups]
    fig, ax = plt.subplots(figsize=(max(3.0, 0.6 * len(groups) + 1.5), 2.6))
    ax.bar(range(len(groups)), values, yerr=[low, high], color=colours, capsize=3)
    ax.set_xticks(range(len(groups)), [g["group"] for g in groups], fontsize=7, rotation=30)
    ax.set_title(f"v{version} {segment['segment']}: selection rate (95% CI; grey: below min group size)", fontsize=8)
    ax.tick_params(labelsize=7)
    return _svg(fig)


def _fairness_table(segment: dict[str, Any]) -> str:
    breached = {b["group"]: b for b in segment["breaches"]}
    rows = []
    for g in segment["groups"]:
        mark = "reference" if g["group"] == segment["reference"] else ("BREACH" if g["group"] in breached else "")
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            g["group"], g["n"], g["labeled"], _ci(g["selection_rate"]), _ci(g["spd"]), _ci(g["dir"]),
            _ci(g["tpr"]), _ci(g["fpr"]), _ci(g["accuracy"]), mark)) + "</tr>")
    summary = ", ".join(f"{k.replace('_', ' ')} {_ci(v)}" for k, v in segment["summary"].items() if v)
    head = "".join(f"<th>{h}</th>" for h in ("group", "n", "labeled", "selection rate", "SPD", "DIR", "TPR", "FPR",
                                              "accuracy", ""))
    return (f"<h4>{html.escape(segment['segment'])} (reference {html.escape(str(segment['reference']))})</h4>"
            f"<p>{html.escape(summary)}</p><table><tr>{head}</tr>{''.join(rows)}</table>")


def write_html(report: dict[str, Any], path: str | Path) -> Path:
    """Write the self-contained HTML report (needs matplotlib: ``pip install 'lockgate[reports]'``)."""
    import matplotlib

    matplotlib.use("Agg")
    parts: list[str] = []
    chart = _quality_chart(report)
    if chart:
        parts.append(f"<h2>Quality over time</h2>{chart}")
    calibration = _calibration_chart(report)
    for version, data in report["versions"].items():
        total = data["total"]
        if total is None:
            continue
        q = total["quality"]
        metrics = ", ".join(f"{k} {_ci(v)}" for k, v in q["metrics"].items() if isinstance(v, dict) and "value" in v)
        parts.append(f"<h2>Version {html.escape(version)}</h2><p>{q['predictions']} predictions, {q['labeled']} labeled "
                     f"(coverage {_fmt(q['coverage'], 3)}, label delay p50 {_fmt(q['delay_s']['p50'], 0)} s). "
                     f"{html.escape(metrics)}</p>")
        cm = q["metrics"].get("confusion_matrix")
        if cm:
            parts.append(_confusion_chart(cm["classes"], cm["rows_true_columns_predicted"], f"v{version} confusion matrix"))
        for segment in total["fairness"]:
            bars = _fairness_chart(segment, version)
            parts.append(f"<div class='seg'>{bars or ''}{_fairness_table(segment)}</div>")
    if calibration:
        parts.append(f"<h2>Calibration</h2>{calibration}")
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>Outcomes report {html.escape(report['model'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ddd;padding:2px 6px}} .seg{{margin:1em 0}} svg{{max-width:100%;height:auto}}</style></head><body>
<h1>Outcomes report: {html.escape(report['model'])}</h1>
<p>Task {html.escape(report['task'])}; windows of {report['window_seconds']:g} s by prediction time; protected segments
{html.escape(', '.join(report['protected']) or 'none')}; bounds SPD ±{report['fairness_bounds']['spd']},
DIR {report['fairness_bounds']['dir']}, min group size {report['fairness_bounds']['min_group_size']}.</p>
{''.join(parts)}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
