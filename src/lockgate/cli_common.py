"""What every ``lockgate`` command shares, so a command added later fits without thinking:

* **Output.** ``Output(as_json).emit(data, render)`` prints ``data`` as JSON with ``--json``
  and otherwise calls ``render(console)``. The console is full width when stdout is not a
  terminal (no table cut at 80 columns in a pipe or a log) and carries no colour codes there.
* **Common options.** ``--server``, ``--token``, ``--ca-file``, ``--json`` and ``--store`` are
  declared once, with their help text and defaults.
* **Help conventions.** ``conventional(command)`` walks the click tree typer built and writes
  arguments as ``MODEL VERSION`` (not ``{model}``), flags without a type (not ``<bool>``),
  and valued options with a classic metavar (``TEXT``, ``INTEGER``, ``PATH``); the test of
  the command tree checks every command has ``--json`` and every option help with its default.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperArgument, TyperOption

DEFAULT_SERVER = "127.0.0.1:8001"
UNBOUNDED_WIDTH = 10_000


def _width(stream: IO[str]) -> int | None:
    """``None`` (rich measures the terminal) on a TTY; else ``COLUMNS`` if set, else no limit."""
    try:
        if stream.isatty():
            return None
    except (AttributeError, ValueError):
        pass
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else UNBOUNDED_WIDTH


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=_width(stream), highlight=False)


console = make_console()
err_console = make_console(stderr=True)


def print_json(value: Any) -> None:
    """Stable, sorted JSON on stdout (``default=str`` for timestamps and paths)."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 1) -> NoReturn:
    """An error for a person: one line on stderr, exit ``code``, never a traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def make_table(title: str | None = None, **options: Any) -> Table:
    """A rich table whose title never wraps: the table is at least as wide as its title."""
    if title:
        options.setdefault("min_width", len(Text.from_markup(title).plain))
    return Table(title=title, **options)


@dataclass(frozen=True, slots=True)
class Output:
    """One command's result: JSON with ``--json``, else whatever ``render`` prints."""

    as_json: bool

    def emit(self, data: Any, render: Callable[[Console], None] | None = None) -> None:
        if self.as_json or render is None:
            print_json(data)
        else:
            render(console)

    def message(self, data: Any, text: str) -> None:
        """A one-line result: ``text`` for people, ``data`` for ``--json``."""
        self.emit(data, lambda c: c.print(text, highlight=False, soft_wrap=True))


# ---------------------------------------------------------------------- help conventions
def with_default(help_text: str, default: Any) -> str:
    """``help_text`` plus a ``[default: ...]`` that survives typer's rich markup."""
    return f"{help_text} {escape(f'[default: {default}]')}"


# ---------------------------------------------------------------------- common options
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables or text.")]
ServerOpt = Annotated[str, typer.Option(
    "--server", envvar="LOCKGATE_SERVER", metavar="HOST:PORT",
    help="Admin API address: the server's gRPC (inference) port.")]
TokenOpt = Annotated[str, typer.Option(
    "--token", envvar="LOCKGATE_TOKEN", metavar="TOKEN", show_default=False,
    help=with_default("Bearer token of the caller (its name is the actor in the audit trail).", "none"))]
CaOpt = Annotated[Optional[Path], typer.Option(
    "--ca-file", envvar="LOCKGATE_CA_FILE", metavar="FILE",
    help=with_default("TLS: CA certificate that signed the server's certificate.", "plaintext"))]
StoreOpt = Annotated[Optional[str], typer.Option(
    "--store", metavar="DIR|FILE|URL",
    help=with_default("Offline: read the state dir, .db file or postgresql:// URL directly instead of asking a server.",
                      "ask the server"))]



class _PlainArgument(TyperArgument):
    """Usage line ``MODEL VERSION [WEIGHTS]...`` instead of typer's ``{model} {version}``,
    and no ``<str>`` beside the name (the name already says what it is)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        if not self.required:
            name = f"[{name}]"
        if self.nargs != 1:
            name += "..."
        return name


def _metavar(param: Any) -> str:
    """A classic metavar from the option's type (typer >= 0.2x describes types itself)."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None:  # click-based typer
        kind = param.type
        if getattr(kind, "choices", None):
            return "|".join(str(c) for c in kind.choices)
        return {"integer": "INTEGER", "float": "FLOAT", "boolean": "BOOLEAN", "path": "PATH"}.get(kind.name, "TEXT")
    if desc.is_choice:
        return "|".join(str(c) for c in desc.choices or ())
    if desc.is_path:
        return "PATH"
    annotation = desc.annotation
    if getattr(annotation, "__origin__", None) is list:
        annotation = annotation.__args__[0]
    return {int: "INTEGER", float: "FLOAT", bool: "BOOLEAN"}.get(annotation, "TEXT")


# ``Command`` below is the click command typer builds (its own vendored click in typer >= 0.2x,
# so it is duck-typed here rather than imported).
def conventional(command: Any) -> Any:
    """Apply lockgate's help conventions to every command and option under ``command``."""
    for param in command.params:
        if isinstance(param, TyperArgument):
            if param.metavar is None:
                param.metavar = (param.name or "").upper()
            if hasattr(TyperArgument, "_usage_display_name"):  # typer's braces style
                param.__class__ = _PlainArgument
        elif isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = "" if param.is_flag else _metavar(param)
    _plain_help_option(command)
    for sub in getattr(command, "commands", {}).values():
        conventional(sub)
    return command


def _plain_help_option(command: Any) -> None:
    """``--help`` is built lazily by (typer's) click; build it now and drop its ``<bool>``."""
    if not hasattr(command, "get_help_option") or not hasattr(command, "context_class"):
        return
    try:
        option = command.get_help_option(command.context_class(command, info_name=command.name))
    except Exception:  # an older click: nothing to fix
        return
    if option is not None and getattr(option, "metavar", "") is None:
        option.metavar = ""


def walk(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every leaf command with its path, e.g. ``(("models", "approve"), <Command>)``."""
    if hasattr(command, "commands"):
        found: list[tuple[tuple[str, ...], Any]] = []
        for name, sub in sorted(command.commands.items()):
            found.extend(walk(sub, (*path, name)))
        return found
    return [(path, command)]
