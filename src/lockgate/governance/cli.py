"""``lockgate profile ...`` and ``lockgate drift ...`` (typer sub-apps the main CLI mounts)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .config import GovernanceConfig
from .profile import DEFAULT_KLL_K, ReferenceProfile, build_profile, class_names, load_data
from .report import compute_report, print_report, write_html

profile_app = typer.Typer(help="Reference profiles for drift detection.", no_args_is_help=True)
drift_app = typer.Typer(help="Drift reports.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


@profile_app.callback()
def _profile_group() -> None:
    """Reference profiles for drift detection."""


@drift_app.callback()
def _drift_group() -> None:
    """Drift reports."""

_REPO_DEFAULT = Path(os.environ.get("LOCKGATE_MODEL_REPOSITORY", "models"))


def _governance_of(model_dir: Path) -> GovernanceConfig | None:
    """The ``governance:`` section of the model's config.yaml, if any."""
    path = model_dir / "config.yaml"
    if not path.exists():
        return None
    import yaml

    raw = yaml.safe_load(path.read_text()) or {}
    section = raw.get("governance") if isinstance(raw, dict) else None
    return GovernanceConfig.model_validate(section) if section else None


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
    model: str = typer.Option(..., "--model", help="model name"),
    version: str = typer.Option(..., "--version", help="model version"),
    data: Path = typer.Option(..., "--data", help="reference data: .npy, .npz, .csv or .parquet"),
    model_repository: Path = typer.Option(_REPO_DEFAULT, "--model-repository", help="model repository root"),
    input_name: str | None = typer.Option(None, "--input", help="input the data belongs to (single-input data)"),
    bins: int = typer.Option(20, "--bins", help="equal-frequency bins per numeric feature"),
    kll_k: int = typer.Option(DEFAULT_KLL_K, "--kll-k", help="KLL sketch k of the reference (its CDF for KS and W1; larger is more exact)"),
    outputs: bool = typer.Option(True, "--outputs/--no-outputs", help="run the model to profile its outputs"),
) -> None:
    """Build REPO/<model>/<version>/reference_profile.json from reference data."""
    version_dir = model_repository / model / version
    if not version_dir.is_dir():
        console.print(f"[red]model version directory {version_dir} does not exist[/red]")
        raise typer.Exit(1)
    try:
        loaded = load_data(data)
    except (RuntimeError, ValueError, FileNotFoundError, OSError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    governance = _governance_of(model_repository / model)
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
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console) as progress:
        output_arrays: dict[str, np.ndarray] = {}
        if outputs and model_file is not None:
            try:
                output_arrays = _run_model(model_file, arrays, progress)
            except Exception as exc:  # the input profile is still useful without outputs
                console.print(f"[yellow]outputs not profiled: {exc}[/yellow]")
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
            allowed=allowed,
            bins=bins,
            kll_k=kll_k,
            progress=lambda _name: progress.update(task, advance=1),
        )
    path = profile.save(ReferenceProfile.path_for(model_repository, model, version))
    console.print(f"reference profile of {model} v{version}: {profile.rows} rows, {total} features -> {path}")


def locate(config: Path | None, model_repository: Path | None, state_dir: Path | None, model: str,
           store: str | None = None) -> tuple[Path, Path, str | None]:
    """Model repository, state directory and store, found the way ``serve`` finds them
    (flags, then ``LOCKGATE_*`` variables, then ``--config``, then the defaults:
    ``lockgate.config.ServerSettings.load``). Where nothing named them, the defaults are
    checked for this model, and so is the demo's layout (``lockgate demo`` writes the
    repository to ``demo-repo`` and keeps its state in ``demo-repo/.lockgate``), so the
    report works right after ``make demo``."""
    from lockgate.config import ServerSettings
    from lockgate.demo import DEFAULT_DIR

    settings = ServerSettings.load(config, model_repository=model_repository, state_dir=state_dir, store=store)
    defaults = ServerSettings()
    repository = settings.model_repository
    if settings.model_repository == defaults.model_repository and not (repository / model).is_dir():
        repository = next((c for c in (DEFAULT_DIR,) if (c / model).is_dir()), repository)
    state = settings.state_dir
    if settings.state_dir == defaults.state_dir:
        candidates = [repository / ".lockgate", settings.state_dir]
        state = next((c for c in candidates if (c / "drift" / model).is_dir() or (c / "lockgate.db").exists()), state)
    return repository, state, settings.store


_FAIL_ON = {"none": 99, "inconclusive": 1, "warn": 2, "drift": 3}


@drift_app.command("report")
def report(
    model: str = typer.Option(..., "--model", help="model name"),
    version: str | None = typer.Option(
        None, "--version", help="model version [the serving version (traffic policy, registry, default_version) with a profile and windows]"
    ),
    windows: int = typer.Option(1, "--windows", help="merge the newest N closed windows (0 = all)"),
    html: Path | None = typer.Option(None, "--html", help="also write a self-contained HTML report (charts need lockgate[report])"),
    json_output: bool = typer.Option(False, "--json", help="print the report as JSON (provenance, summary, every feature) instead of a table"),
    charts: int = typer.Option(40, "--charts", help="charts in the HTML for at most this many features (alerts first)"),
    fail_on: str = typer.Option("none", "--fail-on", help="exit 2 when the status is at least: none | inconclusive | warn | drift"),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="server state directory [as serve: LOCKGATE_STATE_DIR, --config, .lockgate; else <repository>/.lockgate]"),
    model_repository: Path | None = typer.Option(None, "--model-repository", help="model repository root [as serve: LOCKGATE_MODEL_REPOSITORY, --config, models; else demo-repo]"),
    config: Path | None = typer.Option(None, "--config", help="the server's YAML config file, to find the repository, state and store as serve does"),
    store: str | None = typer.Option(None, "--store", help="control-plane store for provenance [<state-dir>/lockgate.db]"),
) -> None:
    """Drift of the latest closed window(s) against the reference profile, with its provenance."""
    import json as _json

    from .decision import RANK
    from .provenance import collect
    from .report import choose_version, report_document

    if fail_on not in _FAIL_ON:
        console.print(f"[red]--fail-on must be one of {', '.join(_FAIL_ON)}[/red]")
        raise typer.Exit(1)
    repository, state, store_location = locate(config, model_repository, state_dir, model, store)
    try:
        why = "named with --version"
        if version is None:
            version, why = choose_version(repository, state, model, store_location)
        governance = _governance_of(repository / model)
        from lockgate.config import ModelConfigFile

        parameters = ModelConfigFile.load(repository / model / "config.yaml").parameters
        profile_path = ReferenceProfile.path_for(repository, model, version)
        if not profile_path.exists():
            raise FileNotFoundError(
                f"no reference profile at {profile_path}; build one with `lockgate profile build --model {model} "
                f"--version {version} --data FILE --model-repository {repository}`"
            )
        profile = ReferenceProfile.load(profile_path)
        result = compute_report(repository, state, model, version, windows or None, governance.drift if governance else None,
                                class_names=class_names(parameters, profile))  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from exc
    provenance = collect(repository, state, model, version, profile=profile, profile_path=profile_path, window=result,
                         store=store_location)  # fmt: skip
    if json_output:
        document = report_document(result, provenance)
        document["version_choice"] = why
        typer.echo(_json.dumps(document, indent=2, allow_nan=False))
    else:
        console.print(f"version {version}: {why}; repository {repository}, state {state}", highlight=False)
        print_report(result, console, provenance)
    if html is not None:
        path = write_html(result, html, provenance, max_charts=charts)
        (err_console if json_output else console).print(f"HTML report: {path}", highlight=False)
    if RANK[result.status] >= _FAIL_ON[fail_on]:
        raise typer.Exit(2)
