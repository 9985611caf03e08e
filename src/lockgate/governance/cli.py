"""``lockgate profile ...`` and ``lockgate drift ...`` (typer sub-apps the main CLI mounts)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import numpy as np
import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lockgate.cli_common import JsonOpt, Output, err_console, fail, with_default

from .config import GovernanceConfig
from .profile import DEFAULT_KLL_K, ReferenceProfile, build_profile, load_data

profile_app = typer.Typer(help="Reference profiles for drift detection.", no_args_is_help=True)
drift_app = typer.Typer(help="Drift reports.", no_args_is_help=True)


@profile_app.callback()
def _profile_group() -> None:
    """Reference profiles for drift detection."""


@drift_app.callback()
def _drift_group() -> None:
    """Drift reports."""


_REPO_HELP = "env LOCKGATE_MODEL_REPOSITORY, --config, else models/ (or demo-repo/ if only it has the model)"
_STATE_HELP = "env LOCKGATE_STATE_DIR, --config, else <model repository>/.lockgate"


def _governance_of(model_dir: Path) -> GovernanceConfig | None:
    """The model's ``governance:`` section, read as serve reads the model config, if any."""
    section = _section_of(model_dir, "governance")
    return GovernanceConfig.model_validate(section) if section else None


def _section_of(model_dir: Path, key: str) -> dict | None:
    """One lockgate section (``governance``, ``explain``) of the model's config, read as serve reads it."""
    from lockgate.serving.model_config import read_model_config

    section = getattr(read_model_config(model_dir), key)
    return section if isinstance(section, dict) else None


def _output_labels(model_dir: Path, outputs: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Class names from the model config for outputs with one column per class."""
    from lockgate.serving.model_config import ModelConfigError, read_model_config

    try:
        labels = read_model_config(model_dir).labels()
    except (ModelConfigError, ValueError, OSError):
        return {}
    return {name: names for name, names in labels.items()
            if name in outputs and outputs[name].ndim >= 2 and outputs[name].shape[-1] == len(names)}


def _onnx_file(version_dir: Path) -> Path | None:
    candidates = sorted(version_dir.glob("*.onnx"))
    return candidates[0] if candidates else None


def _onnx_input_names(model_file: Path | None) -> list[str]:
    if model_file is None:
        return []
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    initialisers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initialisers]


def _run_model(model_file: Path, inputs: dict[str, np.ndarray], progress: Progress) -> dict[str, np.ndarray]:
    """Reference outputs, so output drift has a baseline too."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()}
    n = min(len(a) for a in inputs.values())
    batch = 1024
    task = progress.add_task("running model for output profile", total=n)
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch):
        feed = {}
        for name, array in inputs.items():
            dtype = np.float32 if types.get(name) == "tensor(float)" else (np.int64 if types.get(name) == "tensor(int64)" else array.dtype)
            feed[name] = np.ascontiguousarray(array[start : start + batch], dtype=dtype)
        for meta, value in zip(session.get_outputs(), session.run(None, feed)):
            if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                chunks.setdefault(meta.name, []).append(value)
        progress.update(task, advance=min(batch, n - start))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


@profile_app.command("build")
def build(
    model: str = typer.Option(..., "--model", help="Model name."),
    version: str = typer.Option(..., "--version", help="Model version."),
    data: Path = typer.Option(..., "--data", help="Reference data: .npy, .npz, .csv or .parquet."),
    model_repository: Path | None = typer.Option(
        None, "--model-repository", help=with_default("Model repository root, found as serve finds it.", _REPO_HELP)),
    input_name: str | None = typer.Option(
        None, "--input", help=with_default("Input the data belongs to (single-input data).", "the model's only input")),
    bins: int = typer.Option(20, "--bins", help="Equal-frequency bins per numeric feature."),
    kll_k: int = typer.Option(
        DEFAULT_KLL_K, "--kll-k", help="KLL sketch k of the reference (its CDF gives KS and W1; larger is more exact)."),
    outputs: bool = typer.Option(True, "--outputs/--no-outputs", help="Run the model to profile its outputs."),
    background: int = typer.Option(100, "--background", help="Rows sampled as the explanation background (0: none)."),
    importance_rows: int = typer.Option(
        100, "--importance-rows", help="Reference rows explained for the reference importance (0: none)."),
    config: Path | None = typer.Option(None, "--config", help=with_default("The server's YAML config file, to find the repository.", "none")),
    as_json: JsonOpt = False,
) -> None:
    """Build REPO/<model>/<version>/reference_profile.json (and the explanation background) from reference data."""
    model_repository, _state, _store = locate(config, model_repository, None, model)
    version_dir = model_repository / model / version
    if not version_dir.is_dir():
        fail(f"model version directory {version_dir} does not exist (pass --model-repository)")
    try:
        loaded = load_data(data)
    except (RuntimeError, ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    try:
        governance = _governance_of(model_repository / model)
    except ValueError as exc:
        fail(str(exc))
    model_file = _onnx_file(version_dir)
    arrays = dict(loaded.arrays)
    if "" in arrays:
        names = _onnx_input_names(model_file)
        name = input_name or (names[0] if len(names) == 1 else None) or (next(iter(governance.inputs)) if governance and len(governance.inputs) == 1 else "input")
        arrays = {name: arrays.pop("")}
    feature_names: dict[str, list[str]] = {}
    categorical: dict[str, set[int]] = {}
    allowed: dict[str, dict[int, list[int]]] = {}
    for name, array in arrays.items():
        n = array.shape[-1] if array.ndim >= 2 else 1
        spec = governance.inputs.get(name) if governance else None
        if spec is not None:
            feature_names[name] = spec.names(n)
            categorical[name] = spec.categorical_indices(n)
            allowed[name] = {j: list(r.allowed) for j, r in spec.resolve(n).items() if r.allowed}
        elif loaded.feature_names and len(loaded.feature_names) == n:
            feature_names[name] = loaded.feature_names
    total = sum(a.shape[-1] if a.ndim >= 2 else 1 for a in arrays.values())
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=err_console) as progress:
        output_arrays: dict[str, np.ndarray] = {}
        if outputs and model_file is not None:
            try:
                output_arrays = _run_model(model_file, arrays, progress)
            except Exception as exc:  # the input profile is still useful without outputs
                err_console.print(f"[yellow]outputs not profiled: {exc}[/yellow]")
        total += sum(a.shape[-1] if a.ndim >= 2 else 1 for a in output_arrays.values())
        task = progress.add_task("profiling features", total=total)
        profile = build_profile(
            arrays,
            feature_names,
            categorical,
            model=model,
            version=version,
            outputs=output_arrays,
            classifier_outputs=[n for n, a in output_arrays.items() if a.dtype.kind == "f" and a.ndim >= 2 and a.shape[-1] > 1],
            output_feature_names=_output_labels(model_repository / model, output_arrays),
            allowed=allowed,
            bins=bins,
            kll_k=kll_k,
            progress=lambda _name: progress.update(task, advance=1),
        )
    path = profile.save(ReferenceProfile.path_for(model_repository, model, version))
    result = {"model": model, "version": version, "rows": profile.rows, "features": total, "path": str(path),
              "tensors": {name: t.feature_names for name, t in profile.tensors.items()}}
    text = f"reference profile of {model} v{version}: {profile.rows} rows, {total} features -> {path}"
    if background > 0:
        from lockgate.explain.reference import write_background

        try:
            bg_path, note = write_background(
                model_repository, model, version, arrays, rows=background, importance_rows=importance_rows,
                model_file=model_file, explain_section=_section_of(model_repository / model, "explain"),
                feature_names=feature_names,
            )
        except ValueError as exc:
            note, bg_path = f"no explanation background: {exc}", None
        result["explanation_background"] = {"path": str(bg_path) if bg_path else None, "rows": background, "note": note}
        text += (f"\nexplanation background: {background} rows, {note} -> {bg_path}" if bg_path else f"\n{note}")
    Output(as_json).message(result, text)


def locate(config: Path | None, model_repository: Path | None, state_dir: Path | None, model: str,
           store: str | None = None) -> tuple[Path, Path, str | None]:
    """Model repository, state directory and store, found the way ``serve`` finds them:
    ``ServerSettings.load`` (flags, then ``LOCKGATE_*`` variables, then ``--config``, then the
    defaults; the state directory defaults to ``<model repository>/.lockgate``,
    ``lockgate.config.default_state_dir``). Where nothing named the repository and the default
    one lacks the model, the demo's repository (``lockgate demo --dir``'s default) is taken if
    it has it, so the commands work right after ``make demo`` without a flag."""
    from lockgate.config import DEMO_REPOSITORY, ServerSettings

    settings = ServerSettings.load(config, model_repository=model_repository, state_dir=state_dir, store=store)
    default_repository = ServerSettings.model_fields["model_repository"].default
    if (settings.model_repository == default_repository and not (settings.model_repository / model).is_dir()
            and (DEMO_REPOSITORY / model).is_dir()):
        settings = ServerSettings.load(config, model_repository=DEMO_REPOSITORY, state_dir=state_dir, store=store)
    return settings.model_repository, settings.state_dir, settings.store


class FailOn(StrEnum):
    """``--fail-on``: the least status that makes ``drift report`` exit 2 (for CI gates)."""

    none = "none"
    inconclusive = "inconclusive"
    warn = "warn"
    drift = "drift"


_FAIL_RANK = {FailOn.none: 99, FailOn.inconclusive: 1, FailOn.warn: 2, FailOn.drift: 3}


@drift_app.command("report")
def report(
    model: str = typer.Option(..., "--model", help="Model name."),
    version: str | None = typer.Option(None, "--version", help=with_default(
        "Model version.", "the serving version (traffic policy, registry, default_version) that has a profile and windows")),
    windows: int = typer.Option(1, "--windows", help="Merge the newest N closed windows (0 = all)."),
    html: Path | None = typer.Option(None, "--html", help=with_default(
        escape("Also write a self-contained HTML report here (charts need lockgate[report])."), "no HTML")),
    charts: int = typer.Option(40, "--charts", help="Charts in the HTML for at most this many features (alerts first)."),
    fail_on: FailOn = typer.Option(FailOn.none, "--fail-on", help="Exit 2 when the overall status is at least this."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help=with_default("Server state directory.", _STATE_HELP)),
    model_repository: Path | None = typer.Option(
        None, "--model-repository", help=with_default("Model repository root.", _REPO_HELP)),
    config: Path | None = typer.Option(None, "--config", help=with_default(
        "The server's YAML config file, to find the repository, state and store as serve does.", "none")),
    store: str | None = typer.Option(None, "--store", help=with_default(
        "Control-plane store the provenance is read from (postgresql://... or a SQLite path).", "<state dir>/lockgate.db")),
    as_json: JsonOpt = False,
) -> None:
    """Drift of the latest closed window(s) against the reference profile, with its provenance."""
    from .decision import RANK
    from .provenance import collect
    from .report import Section, choose_version, compute_report, evaluation_basis, print_report, report_document, write_html

    repository, state, store_location = locate(config, model_repository, state_dir, model, store)
    try:
        why = "named with --version"
        if version is None:
            version, why = choose_version(repository, state, model, store_location)
        basis = evaluation_basis(repository, model, version)
        result = compute_report(repository, state, model, version, windows or None, basis=basis)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    from lockgate.explain.report import html_section, importance_section, table as importance_table, traffic_roles

    provenance = collect(repository, state, model, version, profile=basis.profile, profile_path=basis.profile_path,
                         window=result, store=store_location)  # fmt: skip
    importance = importance_section(repository, state, model, result.version, windows or None,
                                    roles=traffic_roles(state, model))
    document = {**report_document(result, provenance), "version_choice": why,
                "importance": importance.to_dict() if importance is not None else None}

    def render(out) -> None:
        out.print(f"version {version}: {why}; repository {repository}, state {state}", highlight=False)
        print_report(result, out, provenance)
        if importance is not None:
            out.print(importance_table(importance))

    Output(as_json).emit(document, render)
    if html is not None:
        extra = [Section("importance", "Feature importance", html_section(importance))] if importance is not None else []
        path = write_html(result, html, provenance, max_charts=charts, extra=extra)
        err_console.print(f"HTML report: {path}", highlight=False)
    if RANK[result.status] >= _FAIL_RANK[fail_on]:
        raise typer.Exit(2)
