"""Drift reports for operators and auditors: a terminal table, JSON, and a self-contained HTML page.

The HTML is built from an ordered list of :class:`Section`\\ s (provenance, summary, how to
read it, per-feature detail, notes), so another kind of evidence -- attribution drift, say --
is one more section. The page has no external asset: charts are inline SVG (matplotlib,
text as paths), styles are inline, nothing is fetched.

:func:`compute_report` evaluates the newest persisted windows of a version against its
profile; :func:`choose_version` picks the version when none is named.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lockgate.config import ModelConfigFile

from . import charts
from .config import DriftConfig, GovernanceConfig
from .decision import DRIFT, INCONCLUSIVE, OK, RANK, WARN
from .drift import DriftReport, FeatureDrift, evaluate, load_windows, window_dir
from .profile import ReferenceProfile, class_names
from .provenance import Provenance, serving_candidates
from .state import merge_all

_COLOURS = {OK: "green", WARN: "yellow", DRIFT: "red", INCONCLUSIVE: "blue"}
_HTML_COLOURS = {OK: "#2e7d32", WARN: "#ed6c02", DRIFT: "#c62828", INCONCLUSIVE: "#1565c0"}

EXPLANATIONS: dict[str, str] = {
    "status": "OK: no rule found a change that is both significant and material. WARN / DRIFT: a rule's effect reached "
              "half of / all of its threshold and its test was significant after the correction. INCONCLUSIVE: the "
              "window is below min_rows, or a feature had no rows: it was not checked, which is not OK.",
    "significance": "Each rule has a test. Its p-value is the chance of a difference at least this large if nothing had "
                    "changed. All p-values of a window are corrected together (Holm-Bonferroni by default); a rule can "
                    "only fire when its adjusted p-value is at most alpha, so an unchanged window raises any alert with "
                    "probability at most alpha, whatever its size and feature count.",
    "psi": "Population stability index over the bins of the values the reference knows: sum of (q - p) ln(q / p). The "
           "decision uses PSI minus its expectation when nothing changed, (B - 1)(1/n + 1/N), shown as 'noise'.",
    "wasserstein": "W1, the area between the reference and window CDFs, in reference standard deviations: a 0.5 sigma "
                   "mean shift reads 0.5. A constant reference has no sigma: W1 is then divided by the constant's "
                   "magnitude (|x_ref|), or shown raw when the constant is 0.",
    "ks": "Kolmogorov-Smirnov: the largest gap between the reference and window CDFs, from the two KLL sketches at every "
          "reference point and 257 window quantiles (within 0.01 of the exact statistic at 10,000 rows). Supporting "
          "evidence; it decides nothing.",
    "js": "Jensen-Shannon distance (base 2, 0 = same, 1 = disjoint) over the known bins. Decides only if thresholds.js is set.",
    "chi2": "Chi-squared test of homogeneity on the 2 x B table of reference and window bin counts; adjacent bins are "
            "pooled until each expects at least 5 values, so the test holds at a few hundred rows.",
    "missing": "NaN and Inf shares of the window against the reference's, each with a two-sided binomial test at the "
               "pooled share; the effect is the absolute change of the share.",
    "new_values": "Share of the window's values that fall in bins the reference never filled: codes never seen (categorical), "
                  "or any value off the known ones (discrete: a constant, a flag, a small count). The report names them "
                  "from the window's sketches; a one-sided binomial test checks them against the reference's zero.",
}


@dataclass(slots=True)
class Section:
    """One part of the HTML report: an anchor, a heading, and its HTML body."""

    id: str
    title: str
    body: str


# ---------------------------------------------------------------- computing
def choose_version(model_repository: Path, state_dir: Path, model: str, store: str | None = None) -> tuple[str, str]:
    """The version a report is about when none is named: the first serving candidate that has
    both a profile and windows; returns (version, why). Raises FileNotFoundError with advice."""
    candidates = serving_candidates(model_repository, state_dir, model, store)
    with_windows = set(versions_with_windows(state_dir, model))
    for version, why in candidates:
        if version in with_windows and ReferenceProfile.path_for(model_repository, model, version).exists():
            return version, why
    for version in sorted(with_windows, key=lambda v: (0, int(v)) if v.isdigit() else (1, v), reverse=True):
        if ReferenceProfile.path_for(model_repository, model, version).exists():
            return version, "the newest version with drift windows and a profile"
    if not with_windows:
        raise FileNotFoundError(
            f"no drift windows for model {model!r} under {Path(state_dir) / 'drift' / model}: a window is written when it "
            "closes (drift.window_rows rows or drift.window_seconds); send traffic, or pass --state-dir"
        )
    missing = ", ".join(sorted(with_windows))
    raise FileNotFoundError(
        f"versions {missing} of {model!r} have drift windows but no reference profile; build one with "
        f"`lockgate profile build --model {model} --version V --data FILE` (windows recorded before the profile are "
        "re-binned from their sketches)"
    )


@dataclass(slots=True)
class EvaluationBasis:
    """What one version's windows are judged with: its reference profile, the drift settings
    and the class names of its outputs -- the same the server's ``GovernanceStage`` uses, so
    the CLI report, its JSON and the console's drift page agree with the served statuses."""

    profile: ReferenceProfile
    profile_path: Path
    config: DriftConfig
    class_names: dict[str, list[str]]


def evaluation_basis(model_repository: str | Path, model: str, version: str,
                     model_config: ModelConfigFile | None = None) -> EvaluationBasis:
    """The basis of ``model`` ``version``. ``model_config``: the loaded model's config (the
    console passes the one the server runs with); else it is read from the repository as serve
    reads it (config.yaml and/or config.pbtxt). Raises FileNotFoundError with advice when the
    version has no profile, ModelConfigError (a ValueError) for a config serve would refuse."""
    profile_path = ReferenceProfile.path_for(model_repository, model, version)
    if not profile_path.exists():
        raise FileNotFoundError(
            f"no reference profile at {profile_path}; build one with `lockgate profile build --model {model} "
            f"--version {version} --data FILE --model-repository {model_repository}` (windows recorded before it are "
            "re-binned from their sketches)"
        )
    if model_config is None:
        from lockgate.serving.model_config import read_model_config

        model_config = read_model_config(Path(model_repository) / model)
    profile = ReferenceProfile.load(profile_path)
    governance = GovernanceConfig.model_validate(model_config.governance or {})
    return EvaluationBasis(profile, profile_path, governance.drift, class_names(model_config.labels(), profile))


def compute_report(
    model_repository: str | Path,
    state_dir: str | Path,
    model: str,
    version: str | None = None,
    windows: int | None = 1,
    basis: EvaluationBasis | None = None,
) -> DriftReport:
    """Evaluate the newest ``windows`` persisted windows (merged; all if None) against the
    version's :func:`evaluation_basis` (read from the repository unless given)."""
    if version is None:
        version, _why = choose_version(Path(model_repository), Path(state_dir), model)
    basis = basis or evaluation_basis(model_repository, model, version)
    states = load_windows(state_dir, model, version, windows)
    if not states:
        raise FileNotFoundError(f"no drift windows under {window_dir(state_dir, model, version)}")
    return evaluate(merge_all(states), basis.profile, basis.config, window=len(states), class_names=basis.class_names)


def window_history(
    model_repository: str | Path,
    state_dir: str | Path,
    model: str,
    version: str,
    last: int = 20,
    basis: EvaluationBasis | None = None,
) -> list[DriftReport]:
    """Each of the newest ``last`` persisted windows evaluated on its own, as
    :func:`compute_report` evaluates them: how one version's drift moved window by window
    (the console charts it)."""
    basis = basis or evaluation_basis(model_repository, model, version)
    states = load_windows(state_dir, model, version, last)
    return [evaluate(state, basis.profile, basis.config, window=index, class_names=basis.class_names)
            for index, state in enumerate(states)]


def versions_with_windows(state_dir: str | Path, model: str) -> list[str]:
    root = Path(state_dir) / "drift" / model
    versions = [p.name for p in root.iterdir() if p.is_dir() and any(p.glob("window-*.bin"))] if root.is_dir() else []
    return sorted(versions, key=lambda v: (0, int(v)) if v.isdigit() else (1, v))


def latest_version(state_dir: str | Path, model: str) -> str:
    versions = versions_with_windows(state_dir, model)
    if not versions:
        raise FileNotFoundError(f"no drift windows for model {model!r} under {Path(state_dir) / 'drift' / model}")
    return versions[-1]


# ---------------------------------------------------------------- summary rows
def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<1e-300" if value < 1e-300 else f"{value:.2g}"


def _name(f: FeatureDrift) -> str:
    return f"{f.tensor}/{f.feature}" if f.index >= 0 else f"{f.tensor}/(classes)"


def summary_row(f: FeatureDrift) -> dict[str, Any]:
    """The summary table's row: status, the deciding rule and statistic, rows, missing, new."""
    decided = f.decided_by[0] if f.decided_by else None
    effect = None
    if decided is not None:
        effect = next((e for e in decided["effects"] if e["statistic"] == decided["decided_by"]), None)
    return {
        "feature": _name(f),
        "kind": f.kind,
        "value_kind": f.value_kind,
        "status": f.status,
        "rule": decided["rule"] if decided else None,
        "statistic": effect["statistic"] if effect else None,
        "value": effect["value"] if effect else None,
        "threshold": effect["threshold"] if effect else None,
        "adjusted_p": decided["adjusted_p"] if decided else None,
        "rows": f.rows,
        "missing_share": None if f.index < 0 else f.missing_share,
        "reference_missing_share": None if f.index < 0 else f.reference_missing_share,
        "new_share": f.new_share if f.value_kind in ("categorical", "discrete") else None,
        "reason": f.reason,
    }


def _ordered(report: DriftReport) -> list[FeatureDrift]:
    """Alerts first (DRIFT, WARN), then inconclusive, then OK; in profile order within each."""
    return sorted(report.features, key=lambda f: -RANK[f.status])


# ---------------------------------------------------------------- terminal
def table(report: DriftReport) -> Table:
    out = Table(
        title=f"Drift: {report.model} v{report.version} — {report.rows} rows, status {report.status} "
        f"(alpha {report.alpha:g}, {report.correction}, {report.tests} tests)"
        + ("" if report.evaluated else f" — below min_rows {report.min_rows}: inconclusive")
    )
    for column in ("feature", "status", "rule", "statistic (DRIFT thr)", "adj. p", "rows", "missing", "new", "PSI", "W1", "KS"):
        out.add_column(column, justify="left" if column in ("feature", "status", "rule", "statistic (DRIFT thr)") else "right")
    for f in _ordered(report):
        row = summary_row(f)
        colour = _COLOURS.get(f.status, "white")
        statistic = "-" if row["statistic"] is None else f"{row['statistic']} {_num(row['value'])} ({_num(row['threshold'], 3)})"
        missing = "-" if row["missing_share"] is None else f"{row['missing_share']:.2%}"
        new = "-" if row["new_share"] is None else f"{row['new_share']:.2%}"
        w1 = "-" if f.wasserstein is None else f"{_num(f.wasserstein)} {f.wasserstein_unit}"
        out.add_row(row["feature"], f"[{colour}]{f.status}[/{colour}]", row["rule"] or "-", statistic, _p(row["adjusted_p"]),
                    str(f.rows), missing, new, _num(f.psi), w1, _num(f.ks))  # fmt: skip
    return out


def print_report(report: DriftReport, console: Console | None = None, provenance: Provenance | None = None) -> None:
    console = console or Console()
    if provenance is not None:
        console.print(f"{report.model} v{report.version}: artifact sha256 {provenance.artifact_sha256 or '?'}; "
                      f"approval {provenance.approval_id or '-'} by {provenance.approver or '-'}; "
                      f"profile {provenance.profile_digest[:16]}… ({provenance.profile_rows} rows)", highlight=False)  # fmt: skip
    console.print(table(report))
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if provenance is not None:
        for missing in provenance.missing:
            console.print(f"[yellow]provenance:[/yellow] {missing}")


# ---------------------------------------------------------------- JSON
def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def report_document(report: DriftReport, provenance: Provenance | None = None) -> dict[str, Any]:
    """Everything the HTML shows, as one JSON-ready document (``drift report --json``)."""
    return _finite({
        "format": "lockgate.drift_report",
        "format_version": 1,
        "provenance": provenance.to_dict() if provenance is not None else None,
        "status": report.status,
        "decision": {"alpha": report.alpha, "correction": report.correction, "tests": report.tests,
                     "min_rows": report.min_rows, "p_value_backend": report.p_value_backend},
        "window": {"start": report.start, "end": report.end, "rows": report.rows, "windows": report.windows,
                   "evaluated": report.evaluated, "accounting": report.accounting,
                   "binned_with_profile": report.window_profile},
        "summary": [summary_row(f) for f in _ordered(report)],
        "features": [_feature_document(f) for f in report.features],
        "notes": report.notes,
        "explanations": EXPLANATIONS,
    })  # fmt: skip


def _feature_document(f: FeatureDrift) -> dict[str, Any]:
    from dataclasses import asdict

    out = asdict(f)
    out["missing_share"], out["reference_missing_share"] = f.missing_share, f.reference_missing_share
    return out


def write_json(report: DriftReport, path: str | Path, provenance: Provenance | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_document(report, provenance), indent=2, allow_nan=False))
    return path


# ---------------------------------------------------------------- HTML
def _e(value: Any) -> str:
    return html.escape(str(value))


def _provenance_section(report: DriftReport, provenance: Provenance | None) -> Section:
    p = provenance or Provenance(model=report.model, version=report.version)
    rows = [
        ("model / version", f"{p.model} v{p.version}" + (f" (registry state {p.state})" if p.state else "")),
        ("artifact", f"{p.artifact or '-'}"),
        ("artifact SHA-256", p.artifact_sha256 or "-"),
        ("registered SHA-256", p.registered_sha256 or "-"),
        ("approval", f"#{p.approval_id} by {p.approver} at {p.approved_at}" if p.approval_id is not None else "-"),
        ("model card digest (SHA-256)", f"{p.card_digest} (record #{p.card_id})" if p.card_digest else "-"),
        ("signed by", f"{p.signer} (manifest {p.manifest_digest})" if p.signer
                      else "unsigned: the card records no verified model.sig" if p.card_digest else "-"),
        ("reference profile", f"{p.profile_path or '-'}"),
        ("profile digest (SHA-256)", report.profile_digest),
        ("profile rows / built", f"{report.profile_rows} rows, built {_iso(report.profile_created)}"),
        ("window", f"{_iso(report.start)} – {_iso(report.end)} UTC, {report.rows} rows, {report.windows} window(s) merged"),
        ("requests in the window", ", ".join(f"{k} {v}" for k, v in report.accounting.items()) or "not recorded"),
        ("decision", f"alpha {report.alpha:g} family-wise per window, {report.correction} correction over {report.tests} tests, "
                     f"min_rows {report.min_rows}; p-values by {report.p_value_backend}"),
        ("generated", f"{p.generated_at} by lockgate {p.lockgate_version}"),
    ]  # fmt: skip
    body = "<table class='kv'>" + "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in rows) + "</table>"
    if p.missing:
        body += "<ul class='missing'>" + "".join(f"<li>{_e(m)}</li>" for m in p.missing) + "</ul>"
    return Section("provenance", "Provenance", body)


def _summary_section(report: DriftReport) -> Section:
    head = ["feature", "status", "deciding rule", "statistic", "value", "DRIFT threshold", "adjusted p", "rows",
            "missing (window / reference)", "new-category share"]  # fmt: skip
    lines = []
    for f in _ordered(report):
        row = summary_row(f)
        missing = "-" if row["missing_share"] is None else f"{row['missing_share']:.2%} / {row['reference_missing_share']:.2%}"
        new = "-" if row["new_share"] is None else f"{row['new_share']:.2%}"
        cells = [f"<a href='#f-{_e(_anchor(f))}'>{_e(row['feature'])}</a>",
                 f"<span class='st' style='color:{_HTML_COLOURS.get(f.status, '#000')}'>{_e(f.status)}</span>",
                 _e(row["rule"] or "-"), _e(row["statistic"] or "-"), _e(_num(row["value"])), _e(_num(row["threshold"], 3)),
                 _e(_p(row["adjusted_p"])), _e(f.rows), _e(missing), _e(new)]  # fmt: skip
        lines.append(f"<tr data-status='{_e(f.status)}'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    body = (f"<p>Overall status <b style='color:{_HTML_COLOURS.get(report.status, '#000')}'>{_e(report.status)}</b> over "
            f"{report.rows} rows.{'' if report.evaluated else ' The window is below min_rows: nothing was checked.'}</p>"
            "<table id='summary-table' class='grid'><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(lines) + "</tbody></table>")  # fmt: skip
    return Section("summary", "Summary", body)


def _explanations_section() -> Section:
    titles = {"status": "Statuses", "significance": "Significance and false alarms", "psi": "PSI", "wasserstein": "W1 / σ",
              "ks": "KS", "js": "Jensen–Shannon", "chi2": "χ² test", "missing": "Missing values",
              "new_values": "New categories and values"}  # fmt: skip
    body = "<dl>" + "".join(f"<dt>{_e(titles[k])}</dt><dd>{_e(v)}</dd>" for k, v in EXPLANATIONS.items()) + "</dl>"
    return Section("explanations", "How to read this report", body)


def _anchor(f: FeatureDrift) -> str:
    return f"{f.tensor}-{f.index}"


def _bins_table(f: FeatureDrift) -> str:
    head = "<tr><th>bin</th><th>reference share</th><th>window share</th><th>window count</th></tr>"
    labels = f.bin_labels or [str(i) for i in range(len(f.reference_fractions))]
    counts = f.live_counts or [0] * len(f.live_fractions)
    shown = charts.shown_bins(f)
    rows = "".join(
        f"<tr><td>{_e(labels[i])}</td><td>{f.reference_fractions[i]:.4f}</td><td>{f.live_fractions[i]:.4f}</td><td>{counts[i]:.0f}</td></tr>"
        for i in shown
    )
    hidden = len(labels) - len(shown)
    note = f"<p class='small'>{hidden} empty bins between known values not shown.</p>" if hidden else ""
    return f"<table class='grid bins'>{head}{rows}</table>{note}"


def _rules_table(f: FeatureDrift, alpha: float) -> str:
    head = "<tr><th>rule</th><th>test</th><th>p</th><th>adjusted p</th><th>effects (value / DRIFT threshold)</th><th>status</th></tr>"
    rows = []
    for r in f.rules:
        effects = ", ".join(f"{e['statistic']} {_num(e['value'])} / {_num(e['threshold'], 3)}" for e in r["effects"])
        rows.append(f"<tr><td>{_e(r['rule'])}</td><td>{_e(r['test'])}</td><td>{_e(_p(r['p_value']))}</td>"
                    f"<td>{_e(_p(r['adjusted_p']))}</td><td>{_e(effects)}</td><td>{_e(r['status'])}</td></tr>")  # fmt: skip
    return f"<table class='grid rules'>{head}{''.join(rows)}</table><p class='small'>significant: adjusted p ≤ alpha {alpha:g}</p>"


def _feature_section(f: FeatureDrift, alpha: float, chart: bool) -> str:
    stats = [("rows", f.rows), ("PSI", _num(f.psi)), ("PSI noise E0", _num(f.psi_noise)), ("JS", _num(f.js)), ("KS", _num(f.ks)),
             ("W1", "-" if f.wasserstein is None else f"{_num(f.wasserstein)} {f.wasserstein_unit}"),
             ("χ²", "-" if f.chi2 is None else f"{_num(f.chi2)} ({f.chi2_dof} dof, p {_p(f.chi2_p)})"),
             ("NaN", f"{f.nan_share:.2%} (reference {f.reference_nan_share:.2%})"),
             ("Inf", f"{f.inf_share:.2%} (reference {f.reference_inf_share:.2%})"),
             ("mean", f"{_num(f.mean)} (reference {_num(f.reference_mean)})"), ("bins", f.binned_from)]  # fmt: skip
    if f.value_kind in ("categorical", "discrete"):
        stats.append(("new values", f"{f.new_share:.2%}"))
    new = ""
    if f.new_values:
        new = ("<p>New values: " + ", ".join(f"<code>{_e(v['value'])}</code> × {v['count']}{'' if v['exact'] else ' (estimate)'}"
                                             for v in f.new_values) + "</p>")  # fmt: skip
    figure = ""
    if chart:
        figure = f"<figure class='chart-box'>{charts.bin_chart_svg(f)}</figure>"
    colour = _HTML_COLOURS.get(f.status, "#000")
    return (f"<article class='feature' id='f-{_e(_anchor(f))}'><h3>{_e(_name(f))} <span style='color:{colour}'>{_e(f.status)}</span>"
            f" <small>{_e(f.kind)}, {_e(f.value_kind)}</small></h3><p class='reason'>{_e(f.reason or 'no rule fired')}</p>"
            + "<p class='small'>" + " · ".join(f"{_e(k)} {_e(v)}" for k, v in stats) + "</p>" + new + figure
            + "<details open><summary>bins</summary>" + _bins_table(f) + "</details>"
            + "<details><summary>rules and tests</summary>" + _rules_table(f, alpha) + "</details></article>")  # fmt: skip


def _features_section(report: DriftReport, max_charts: int) -> Section:
    draw = charts.available()
    parts = []
    if not draw:
        parts.append("<p class='missing'>Charts need matplotlib: <code>pip install 'lockgate[report]'</code>. "
                     "The bin tables below hold every number.</p>")  # fmt: skip
    for i, f in enumerate(_ordered(report)):
        parts.append(_feature_section(f, report.alpha, draw and i < max_charts))
    if draw and len(report.features) > max_charts:
        parts.append(f"<p class='small'>Charts for the first {max_charts} features (alerts first); raise --charts for more.</p>")
    return Section("features", "Features", "".join(parts))


def _notes_section(report: DriftReport) -> Section | None:
    if not report.notes:
        return None
    return Section("notes", "Not evaluated", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else "-"


def sections(report: DriftReport, provenance: Provenance | None = None, max_charts: int = 40,
             extra: Sequence[Section] = ()) -> list[Section]:
    """The report's sections in reading order; ``extra`` (e.g. the feature-importance section of
    ``lockgate.explain.report``) follows the features."""
    notes = _notes_section(report)
    return [_provenance_section(report, provenance), _summary_section(report), _explanations_section(),
            _features_section(report, max_charts), *extra, *([notes] if notes is not None else [])]  # fmt: skip


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table.grid{border-collapse:collapse;font-size:13px;margin:.5em 0}table.grid td,table.grid th{border:1px solid #ccc;padding:3px 6px;text-align:left}
table.grid th{background:#f4f4f4}table.kv th{text-align:left;padding-right:1em;font-weight:600;vertical-align:top}table.kv td code{word-break:break-all}
.feature{border:1px solid #ddd;border-radius:4px;padding:.6em 1em;margin:1em 0}.feature h3{margin:.2em 0}.small{font-size:12px;color:#555}
.reason{font-family:monospace;font-size:12px}.missing{color:#8a4b00}.st{font-weight:700}figure.chart-box{margin:.5em 0}
svg.chart{max-width:100%;height:auto}nav a{margin-right:1em}dt{font-weight:600;margin-top:.5em}"""


def render_html(report: DriftReport, provenance: Provenance | None = None, max_charts: int = 40,
                extra: Sequence[Section] = ()) -> str:
    parts = sections(report, provenance, max_charts, extra)
    nav = "<nav>" + "".join(f"<a href='#{_e(s.id)}'>{_e(s.title)}</a>" for s in parts) + "</nav>"
    body = "".join(f"<section id='{_e(s.id)}'><h2>{_e(s.title)}</h2>{s.body}</section>" for s in parts)
    title = f"Drift report {report.model} v{report.version}"
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{_e(title)}: <span style='color:{_HTML_COLOURS.get(report.status, '#000')}'>"
            f"{_e(report.status)}</span></h1>{nav}{body}</body></html>\n")  # fmt: skip


def write_html(report: DriftReport, path: str | Path, provenance: Provenance | None = None, max_charts: int = 40,
               extra: Sequence[Section] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report, provenance, max_charts, extra), encoding="utf-8")
    return path
