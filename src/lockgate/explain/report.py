"""The importance section of the drift report: mean |attribution| per feature in the newest
importance window(s) of a version, and its shift against the reference importance and
against the other versions of the model (canary vs stable). The drift report calls
``importance_section`` and prints or embeds what it returns; this module owns nothing else."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from lockgate.explain.background import background_path, load_background
from lockgate.explain.importance import ImportanceWindow, importance_shift, load_windows, reference_per_feature, window_dir


@dataclass(slots=True)
class ImportanceSection:
    model: str
    version: str
    window: ImportanceWindow  # the newest windows, merged
    windows: int
    baselines: dict[str, dict[str, float] | None]  # "reference" / "version N" -> importance per feature
    shifts: dict[str, dict[str, Any] | None]  # same keys; None: nothing to compare (inconclusive)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "windows": self.windows, "rows": self.window.rows,
                "method": self.window.method, "importance": self.window.per_feature(),
                "shift": {k: (v["shift"] if v else None) for k, v in self.shifts.items()}}


def _merged(state_dir: str | Path, model: str, version: str, windows: int | None) -> tuple[ImportanceWindow, int] | None:
    found = load_windows(state_dir, model, version, windows)
    if not found:
        return None
    merged = found[0]
    for window in found[1:]:
        try:
            merged = merged.merge(window)
        except ValueError:  # the explained layout changed: keep the newest layout only
            merged = window
    return merged, len(found)


def traffic_roles(state_dir: str | Path, model: str) -> dict[str, str]:
    """{version: "stable" | "canary"} of the model's active canary, from the control-plane store
    in ``state_dir`` (empty without a store, a policy or an active canary)."""
    from lockgate.control.sqlite_store import resolve_db_path
    from lockgate.control.store import open_store
    from lockgate.errors import LockgateError
    from lockgate.routing.policy import TrafficPolicy

    if not resolve_db_path(state_dir).exists():
        return {}
    try:  # labels only: an unreadable store leaves the baselines named by version
        store = open_store(state_dir)
        try:
            record = store.get_policy(model)
        finally:
            store.close()
        canary = TrafficPolicy.from_dict(record.document).canary if record is not None else None
    except LockgateError:
        return {}
    if canary is None or not canary.state.active:
        return {}
    return {canary.stable: "stable", canary.canary: "canary"}


def importance_section(model_repository: str | Path, state_dir: str | Path, model: str, version: str,
                       windows: int | None = 1, roles: dict[str, str] | None = None) -> ImportanceSection | None:
    """None when the version has no closed importance window (no sampled explanations yet).
    ``roles`` ({version: "stable" | "canary"}, see ``traffic_roles``) names the canary's and the
    stable version's baselines, e.g. "version 1 (stable)"."""
    live = _merged(state_dir, model, version, windows)
    if live is None:
        return None
    window, count = live
    baselines: dict[str, dict[str, float] | None] = {}
    path = background_path(model_repository, model, version)
    try:
        baselines["reference"] = reference_per_feature(load_background(path).reference_importance) if path.exists() else None
    except ValueError:
        baselines["reference"] = None
    root = window_dir(state_dir, model, version).parent
    for other in sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if other != str(version):
            found = _merged(state_dir, model, other, windows)
            if found is not None:
                role = (roles or {}).get(other)
                baselines[f"version {other}" + (f" ({role})" if role else "")] = found[0].per_feature()
    importance = window.per_feature()
    shifts = {name: importance_shift(importance, baseline) for name, baseline in baselines.items()}
    return ImportanceSection(model, str(version), window, count, baselines, shifts)


def _shift_text(shift: dict[str, Any] | None) -> str:
    return "inconclusive (nothing to compare)" if shift is None else f"{shift['shift']:.4f}"


def table(section: ImportanceSection) -> Table:
    window = section.window
    out = Table(title=f"Feature importance: {section.model} v{section.version} — {window.rows} explained rows "
                      f"({window.method}), mean |attribution|",
                caption="; ".join(f"shift vs {name}: {_shift_text(s)}" for name, s in section.shifts.items()))
    out.add_column("feature")
    out.add_column("importance", justify="right")
    out.add_column("share", justify="right")
    for name in section.shifts:
        out.add_column(f"Δ share vs {name}", justify="right")
    importance = window.per_feature()
    total = sum(importance.values()) or 1.0
    for feature, value in sorted(importance.items(), key=lambda kv: -kv[1]):
        cells = [feature, f"{value:.4g}", f"{value / total:.3f}"]
        for shift in section.shifts.values():
            delta = shift["features"].get(feature) if shift else None
            cells.append("-" if delta is None else f"{delta['delta']:+.3f}")
        out.add_row(*cells)
    return out


def html_section(section: ImportanceSection) -> str:
    """The body of the HTML drift report's "Feature importance" section (bars of each feature's share)."""
    importance = section.window.per_feature()
    total = sum(importance.values()) or 1.0
    rows = []
    for feature, value in sorted(importance.items(), key=lambda kv: -kv[1]):
        deltas = " · ".join(
            f"Δ vs {html.escape(name)} {s['features'][feature]['delta']:+.3f}"
            for name, s in section.shifts.items() if s and feature in s["features"])
        share = value / total
        rows.append(f'<tr><td>{html.escape(feature)}</td><td>{value:.4g}</td>'
                    f'<td><svg width="200" height="10"><rect width="{200 * share:.1f}" height="10" fill="#4c78a8"/></svg>'
                    f" {share:.3f}</td><td>{deltas}</td></tr>")
    shifts = " · ".join(f"shift vs {html.escape(name)}: {_shift_text(s)}" for name, s in section.shifts.items())
    return (f'<p>{section.window.rows} explained rows ({html.escape(section.window.method)}), '
            f"mean |attribution| per feature; {shifts}</p><table class='grid'><tr><th>feature</th><th>importance</th>"
            f"<th>share</th><th>shift</th></tr>{''.join(rows)}</table>")
