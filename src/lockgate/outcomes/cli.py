"""``lockgate feedback send`` and ``lockgate outcomes report`` (typer sub-apps the main CLI mounts).

``feedback send`` streams a label file (CSV, JSON lines or Parquet with columns
``request_id``, ``row`` (optional, 0), ``label``, ``event_time`` (optional: Unix seconds or
ISO-8601)) through one ``StreamFeedback`` call, with a progress bar and a summary. A refused
label is reported with its file line. ``outcomes report`` asks the server (``GetOutcomes``)
or reads the store offline (``--store`` with ``--model-repository``).
"""

from __future__ import annotations

import csv
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import grpc
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lockgate.cli_common import (
    DEFAULT_SERVER, CaOpt, JsonOpt, Output, ServerOpt, StoreOpt, TokenOpt, err_console, fail, make_table, with_default,
)

feedback_app = typer.Typer(help="Ground-truth labels for served predictions.", no_args_is_help=True)
outcomes_app = typer.Typer(help="Live quality and fairness per version.", no_args_is_help=True)

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@feedback_app.callback()
def _feedback_group() -> None:
    """Ground-truth labels for served predictions."""


@outcomes_app.callback()
def _outcomes_group() -> None:
    """Live quality and fairness per version."""


def _channel(server: str, ca_file: Path | None) -> grpc.Channel:
    if ca_file is not None:
        return grpc.secure_channel(server, grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes()))
    return grpc.insecure_channel(server)


def _metadata(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


# -- label files ------------------------------------------------------------------------------------
def _csv_value(text: str | None) -> Any:
    """A CSV cell as the label it means: empty -> none, true/false -> flag, a number, else a class name."""
    if text is None or not text.strip():
        return None
    value = text.strip()
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return float(value)
    except ValueError:
        return value


def _event_time(value: Any, where: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or timezone.utc).timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        fail(f"{where}: event_time {text!r} is neither Unix seconds nor ISO-8601")
    return moment.replace(tzinfo=moment.tzinfo or timezone.utc).timestamp()


def read_labels(path: Path) -> tuple[list[tuple[str, int, Any, float | None]], str]:
    """(request_id, row, value, event_time) per label, and the file's format."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        fail(f"{path}: unknown label file type {path.suffix!r} (use .csv, .jsonl or .parquet)")
    records: list[dict[str, Any]]
    try:
        if kind == "csv":
            with path.open(newline="", encoding="utf-8") as handle:
                records = [{k: _csv_value(v) if k == "label" else v for k, v in row.items()} for row in csv.DictReader(handle)]
        elif kind == "jsonl":
            records = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError as exc:
                        fail(f"{path} line {number}: not JSON: {exc}")
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                fail("reading Parquet needs pyarrow: pip install 'lockgate[parquet]'")
            records = pq.read_table(path).to_pylist()
    except OSError as exc:
        fail(f"cannot read {path}: {exc}")
    out = []
    for index, record in enumerate(records):
        where = f"{path} {_position(kind, index)}"
        if not isinstance(record, dict) or "request_id" not in record or "label" not in record:
            fail(f"{where}: needs the columns request_id and label (row and event_time are optional)")
        row = record.get("row")
        try:
            row_index = int(row) if row not in (None, "") else 0
        except (TypeError, ValueError):
            fail(f"{where}: row {row!r} is not an integer")
        value = record["label"]
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out.append((str(record["request_id"]), row_index, value, _event_time(record.get("event_time"), where)))
    return out, kind


def _position(kind: str, index: int) -> str:
    return {"csv": f"line {index + 2}", "jsonl": f"line {index + 1}"}.get(kind, f"row {index}")


def _label_proto(pb: Any, request_id: str, row: int, value: Any, event_time: float | None) -> Any:
    label = pb.Label(request_id=request_id, row=row)
    if isinstance(value, bool):
        label.flag = value
    elif isinstance(value, str):
        label.class_name = value
    elif isinstance(value, (int, float)):
        label.number = float(value)
    if event_time is not None:
        label.event_time.seconds = int(math.floor(event_time))
        label.event_time.nanos = int(round((event_time - math.floor(event_time)) * 1e9)) % 1_000_000_000
    return label


def _summary_dict(s: Any) -> dict[str, Any]:
    return {"received": s.received, "accepted": s.accepted, "duplicate": s.duplicate, "unknown": s.unknown,
            "expired": s.expired, "rejected": s.rejected, "rejected_by_reason": dict(s.rejected_by_reason),
            "rejections": [{"index": r.index, "request_id": r.request_id, "row": r.row, "reason": r.reason,
                            "message": r.message} for r in s.rejections]}


@feedback_app.command("send")
def feedback_send(
    model: Annotated[str, typer.Option("--model", help="The model whose predictions the labels are for.")],
    file: Annotated[Path, typer.Option("--file", help="Labels: a .csv, .jsonl or .parquet file.")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Labels per stream message.")] = 4096,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Count malformed labels as rejected instead of stopping at the first.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Stream a label file to the feedback API; print what each label was counted as."""
    from lockgate._proto.lockgate import feedback_pb2 as pb
    from lockgate._proto.lockgate import feedback_pb2_grpc as pb_grpc

    labels, kind = read_labels(file)
    progress = Progress(TextColumn("[bold]labels"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console, disable=as_json)
    task = progress.add_task("send", total=len(labels))

    def messages() -> Iterator[Any]:
        for start in range(0, max(len(labels), 1), batch):
            chunk = labels[start : start + batch]
            yield pb.FeedbackBatch(model=model if start == 0 else "", skip_invalid=skip_invalid,
                                   labels=[_label_proto(pb, *item) for item in chunk])
            progress.advance(task, len(chunk))

    channel = _channel(server, ca_file)
    try:
        with progress:
            summary = pb_grpc.FeedbackServiceStub(channel).StreamFeedback(messages(), metadata=_metadata(token), timeout=3600)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        match = re.match(r"label (\d+) ", details or "")
        where = f" ({file} {_position(kind, int(match.group(1)))})" if match else ""
        fail(f"{code.name if code else 'UNKNOWN'}: {details}{where}")
    finally:
        channel.close()
    result = _summary_dict(summary)

    def render(console: Any) -> None:
        table = make_table(f"feedback for {model} from {file}")
        columns = ("received", "accepted", "duplicate", "unknown", "expired", "rejected")
        for column in columns:
            table.add_column(column, justify="right")
        table.add_row(*(str(result[c]) for c in columns))
        console.print(table)
        for reason, count in sorted(result["rejected_by_reason"].items()):
            console.print(f"rejected ({reason}): {count}")
        for r in result["rejections"][:5]:
            console.print(f"  {file} {_position(kind, r['index'])}: {r['message']}")

    Output(as_json).emit(result, render)


# -- report ------------------------------------------------------------------------------------
def offline_report(store: str, repository: Path, model: str, version: str | None, since: float | None) -> dict[str, Any]:
    """The report straight from a store, with the model's outcomes section from the repository."""
    import yaml

    from lockgate.control.validation import onnx_signature
    from lockgate.errors import LockgateError
    from lockgate.outcomes.service import build_report, compile_spec
    from lockgate.outcomes.store import OutcomeStore

    model_dir = repository / model
    config_path = model_dir / "config.yaml"
    if not config_path.exists():
        fail(f"no {config_path}")
    config = yaml.safe_load(config_path.read_text()) or {}
    if not config.get("outcomes"):
        fail(f"{config_path} has no outcomes: section")
    versions = sorted((p for p in model_dir.iterdir() if p.name.isdigit() and (p / "model.onnx").exists()),
                      key=lambda p: int(p.name))
    if not versions:
        fail(f"no model versions under {model_dir}")
    signature = onnx_signature(versions[-1] / "model.onnx")
    try:
        spec = compile_spec(model, config["outcomes"], [(s.name, s.shape) for s in signature.outputs],
                            [(s.name, s.shape) for s in signature.inputs], config.get("governance"))
        if spec is None:
            fail(f"outcomes are disabled for {model}")
        opened = OutcomeStore.open(store)
        try:
            return build_report(opened, spec, version, since)
        finally:
            opened.close()
    except (LockgateError, ValueError) as exc:
        fail(str(exc))
    raise AssertionError("unreachable")  # pragma: no cover


@outcomes_app.command("report")
def outcomes_report(
    model: Annotated[str, typer.Option("--model", help="The model to report on.")],
    version: Annotated[Optional[str], typer.Option("--version", help=with_default("One version.", "every version"))] = None,
    since: Annotated[Optional[str], typer.Option(
        "--since", help=with_default("Windows from this time on (ISO-8601 or Unix seconds).", "every window kept"))] = None,
    html_file: Annotated[Optional[Path], typer.Option(
        "--html", help=with_default("Also write a self-contained HTML report (charts, viewable offline) here.", "none"))] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None, store: StoreOpt = None,
    model_repository: Annotated[Optional[Path], typer.Option(
        "--model-repository", help=with_default("With --store: where the model's config.yaml is.", "required with --store"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Quality over time per version, confusion matrix, calibration and fairness with intervals."""
    since_s = _event_time(since, "--since") if since else None
    if store is not None:
        if model_repository is None:
            fail("--store needs --model-repository (the model's outcomes: section says how to read the ledger)")
        report = offline_report(store, model_repository, model, version, since_s)
    else:
        from lockgate._proto.lockgate import feedback_pb2 as pb
        from lockgate._proto.lockgate import feedback_pb2_grpc as pb_grpc

        channel = _channel(server, ca_file)
        try:
            response = pb_grpc.FeedbackServiceStub(channel).GetOutcomes(
                pb.OutcomesRequest(model=model, version=version or "", since=since_s or 0.0),
                metadata=_metadata(token), timeout=120)
        except grpc.RpcError as exc:
            fail(f"{exc.code().name}: {exc.details()}")
        finally:
            channel.close()
        report = json.loads(response.report_json)
    if html_file is not None:
        from lockgate.outcomes.report import write_html

        try:
            write_html(report, html_file)
        except ImportError:
            fail("the HTML report draws with matplotlib: pip install 'lockgate[reports]'")
        err_console.print(f"outcomes report written to {html_file}")
    from lockgate.outcomes.report import print_report

    Output(as_json).emit(report, lambda console: print_report(report, console))
